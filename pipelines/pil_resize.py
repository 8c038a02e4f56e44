"""Pillow's `Image.resize`, bit for bit, in torch on any device: the opt-in exact eval resize.

Pillow resizes 8-bit images in two separable passes (horizontal first, unless the height shrinks
much more than the width), each a weighted sum over a
window of source pixels with fixed-point weights (22 fraction bits), rounded and clipped to 8 bits
between the passes; at the borders the window is cut short and its weights renormalised
(`precompute_coeffs` and `ImagingResampleHorizontal/Vertical_8bpc` in Pillow's Resample.c).
NEAREST takes another path (`ImagingScaleAffine` in Geometry.c): source index = floor of a
position accumulated in doubles. This module computes the same windows, integer weights and
indices and applies them with integer arithmetic (a gather and a sum per pass), so the output
equals Pillow's. DALI decodes; this replaces only its resize, which is antialiased like Pillow's
but keeps float between the passes and clamps at the borders.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's for 8-bit images


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
def _nearest(in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's NEAREST source indices: a position accumulated in doubles, then truncated."""
    scale, indices = in_size / out_size, []
    position = scale * 0.5
    for _ in range(out_size):  # added up, not multiplied: the same rounding as Pillow
        indices.append(int(position))
        position += scale
    return torch.tensor(indices)


@lru_cache(maxsize=4096)
def _weights(in_size: int, out_size: int, interpolation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(source indices, fixed-point weights), each (out_size, taps), as Pillow computes them."""
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
    return indices, weights


def _resample(image: torch.Tensor, axis: int, out_size: int, interpolation: str) -> torch.Tensor:
    """One pass along `axis` (0: rows, 1: columns) of an (H, W, C) int32 image."""
    indices, weights = (t.to(image.device) for t in _weights(image.shape[axis], out_size, interpolation))
    # int32 holds every sum: 255 x (sum of |weights| <= 1.2) x 2^22 < 2^31, as in Pillow's own C
    weights = weights.to(torch.int32)
    if axis == 1:
        total = (image[:, indices] * weights[None, :, :, None]).sum(2, dtype=torch.int32)  # (H, out, C)
    else:
        total = (image[indices] * weights[:, :, None, None]).sum(1, dtype=torch.int32)  # (out, W, C)
    return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)


def pil_resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """An (H, W, C) uint8 image resized to `size` (height, width) exactly as Pillow would."""
    height, width = size
    if (image.shape[0], image.shape[1]) == (height, width):
        return image
    if interpolation == "nearest":  # one lookup per axis, no arithmetic
        rows, cols = _nearest(image.shape[0], height), _nearest(image.shape[1], width)
        return image[rows.to(image.device)][:, cols.to(image.device)]
    out = image.to(torch.int32)
    shrink_h, shrink_w = image.shape[0] - height, image.shape[1] - width
    # Pillow 13 (ImagingResampleInner): vertical pass first when the height shrinks by more than
    # twice what the width does; the order matters because of the 8-bit rounding between passes
    axes = (0, 1) if shrink_h > 0 and shrink_h > 2 * shrink_w else (1, 0)
    for axis in axes:
        size = (height, width)[axis]
        if size != out.shape[axis]:
            out = _resample(out, axis, size, interpolation)
    return out.to(torch.uint8)


def exact_eval_image(image: torch.Tensor, spec) -> torch.Tensor:
    """A decoded (H, W, 3) uint8 image through the processor's eval steps, as its PIL backend does
    them: Pillow's resize, center crop with offsets floored, then (x - mean) / std. (3, h, w) float32."""
    resized = pil_resize(image, spec.resized_size(image.shape[0], image.shape[1]), spec.interpolation)
    if spec.crop:
        top, left = (resized.shape[0] - spec.crop[0]) // 2, (resized.shape[1] - spec.crop[1]) // 2
        resized = resized[top:top + spec.crop[0], left:left + spec.crop[1]]
    mean = torch.tensor(spec.pixel_mean, device=image.device)
    std = torch.tensor(spec.pixel_std, device=image.device)
    return ((resized.to(torch.float32) - mean) / std).permute(2, 0, 1)
