"""The eval resizes that run after DALI's decoder, in torch on the loader's device.

- `pil_resize`: Pillow's `Image.resize`, bit for bit (the exact eval resize, `resize="pillow"`).
- `torch_resize`: torch's antialiased interpolation (`resize="torch"`, the default on CPU): on CPU
  its uint8 AVX2 kernels are about 6x faster than DALI's CPU resize and within 1 grey level of
  Pillow; on GPU it runs in float.

Pillow resizes 8-bit images in two separable passes (in an order that depends on the sizes and on
Pillow's version: `vertical_first`), each a weighted sum over a window of source pixels with fixed-point weights (22 fraction bits), rounded and clipped to 8 bits
between the passes; at the borders the window is cut short and its weights renormalised
(`precompute_coeffs` and `ImagingResampleHorizontal/Vertical_8bpc` in Pillow's Resample.c).
NEAREST takes another path (`ImagingScaleAffine` in Geometry.c): source index = floor of a
position accumulated in doubles. This module computes the same windows, integer weights and
indices and applies them with integer arithmetic (a gather and a sum per pass), so the output
equals Pillow's. (DALI's own resize, `resize="dali"`, is antialiased like Pillow's but keeps float
between the passes and clamps at the borders.)
"""

from __future__ import annotations

import math
from functools import lru_cache

import PIL
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's for 8-bit images
PILLOW = tuple(int(part) for part in PIL.__version__.split(".")[:2])


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@lru_cache(maxsize=4096)
def _nearest(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """Pillow's NEAREST source indices: a position accumulated in doubles, then truncated."""
    scale, indices = in_size / out_size, []
    position = scale * 0.5
    for _ in range(out_size):  # added up, not multiplied: the same rounding as Pillow
        indices.append(int(position))
        position += scale
    return torch.tensor(indices, device=device)


@lru_cache(maxsize=4096)
def _weights(in_size: int, out_size: int, interpolation: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source indices, fixed-point weights), each (out_size, taps), as Pillow computes them, on
    `device` (cached: an image size seen once costs nothing more, nor a copy to the GPU)."""
    kernel, base_support = FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    indices = torch.zeros(out_size, taps, dtype=torch.int64)
    weights = torch.zeros(out_size, taps, dtype=torch.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        inverse = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        k = [kernel((x + xmin - center + 0.5) * inverse) for x in range(count)]
        total = 0.0
        for w in k:
            total += w
        if total != 0.0:
            k = [w / total for w in k]
        fixed = [int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS)) for w in k]
        indices[xx, :count] = torch.arange(xmin, xmin + count)
        indices[xx, count:] = xmin
        weights[xx, :count] = torch.tensor(fixed, dtype=torch.int64)
    # int32 holds every sum: 255 x (sum of |weights| <= 1.2) x 2^22 < 2^31, as in Pillow's own C
    return indices.to(device), weights.to(device, torch.int32)


def _resample(image: torch.Tensor, axis: int, out_size: int, interpolation: str) -> torch.Tensor:
    """One pass along `axis` (0: rows, 1: columns) of an (H, W, C) int32 image."""
    indices, weights = _weights(image.shape[axis], out_size, interpolation, image.device)
    if axis == 1:
        total = (image[:, indices] * weights[None, :, :, None]).sum(2, dtype=torch.int32)  # (H, out, C)
    else:
        total = (image[indices] * weights[:, :, None, None]).sum(1, dtype=torch.int32)  # (out, W, C)
    return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)


def vertical_first(in_height: int, in_width: int, height: int, width: int, version: tuple[int, ...] = PILLOW) -> bool:
    """Whether the installed Pillow runs the vertical pass first. The order matters because of the
    8-bit rounding between the passes, and it changed: always horizontal up to 12.1; vertical for
    images over 100 times taller than wide that shrink in height in 12.2 and 12.3 (Image.resize);
    vertical when the height shrinks by more than twice what the width does from 13.0 on
    (ImagingResampleInner)."""
    if version >= (13,):
        return in_height - height > 0 and in_height - height > 2 * (in_width - width)
    if version >= (12, 2):
        return in_height > in_width * 100 and height < in_height
    return False


def pil_resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """An (H, W, C) uint8 image resized to `size` (height, width) exactly as Pillow would."""
    height, width = size
    if (image.shape[0], image.shape[1]) == (height, width):
        return image
    if interpolation == "nearest":  # one lookup per axis, no arithmetic
        return image[_nearest(image.shape[0], height, image.device)][:, _nearest(image.shape[1], width, image.device)]
    out = image.to(torch.int32)
    axes = (0, 1) if vertical_first(image.shape[0], image.shape[1], height, width) else (1, 0)
    for axis in axes:
        size = (height, width)[axis]
        if size != out.shape[axis]:
            out = _resample(out, axis, size, interpolation)
    return out.to(torch.uint8)


def torch_resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """An (H, W, C) uint8 image resized with torch's antialiased interpolation: on CPU its uint8
    AVX2 kernels (Pillow-SIMD's algorithm with 16-bit weights: within 1 grey level of Pillow, about
    5x faster), on GPU in float, rounded. NEAREST uses Pillow's own indices."""
    if interpolation == "nearest":
        return pil_resize(image, size, interpolation)
    x = image.permute(2, 0, 1).unsqueeze(0)
    if image.device.type == "cpu":
        out = torch.nn.functional.interpolate(x.contiguous(memory_format=torch.channels_last), size=size,
                                              mode=interpolation, antialias=True)
    else:
        out = torch.nn.functional.interpolate(x.float(), size=size, mode=interpolation, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].permute(1, 2, 0)


def eval_image(image: torch.Tensor, spec, resize: str) -> torch.Tensor:
    """A decoded (H, W, 3) uint8 image through the processor's eval steps as its PIL backend orders
    them: resize ("pillow" or "torch"), center crop with offsets floored, (x - mean) / std.
    Returns (3, h, w) float32."""
    size = spec.resized_size(image.shape[0], image.shape[1])
    resized = (pil_resize if resize == "pillow" else torch_resize)(image, size, spec.interpolation)
    if spec.crop:
        top, left = (resized.shape[0] - spec.crop[0]) // 2, (resized.shape[1] - spec.crop[1]) // 2
        resized = resized[top:top + spec.crop[0], left:left + spec.crop[1]]
    mean, std = _normalization(spec, image.device)
    return ((resized.to(torch.float32) - mean) / std).permute(2, 0, 1)


@lru_cache(maxsize=64)
def _normalization(spec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(spec.pixel_mean, device=device), torch.tensor(spec.pixel_std, device=device)
