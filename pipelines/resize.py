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
from typing import NamedTuple

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
    indices, weights, _ = _coefficients(in_size, out_size, interpolation)
    # int32 holds every sum: 255 x (sum of |weights| <= 1.2) x 2^22 < 2^31, as in Pillow's own C
    return indices.to(device), weights.to(device, torch.int32)


@lru_cache(maxsize=4096)
def _coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source indices, fixed-point weights, the float weights before fixing), each (out_size,
    taps), on the CPU: Pillow's precompute_coeffs."""
    kernel, base_support = FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    indices = torch.zeros(out_size, taps, dtype=torch.int64)
    weights = torch.zeros(out_size, taps, dtype=torch.int64)
    floats = torch.zeros(out_size, taps, dtype=torch.float64)
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
        floats[xx, :count] = torch.tensor(k, dtype=torch.float64)
    return indices, weights, floats


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


# --- a batch at once (the default on GPU) ------------------------------------------------------

GROUP_BYTES = 512 << 20  # the padded float64 images of one group at most
FLOAT64: bool | None = None  # the batched passes' arithmetic; None: by device (_float64_is_fast)
SPLIT_TAPS = 258  # float32 passes are exact while taps x 255 x 255 < 2^24
# GPUs whose float64 matmuls run near their float32 rate: P100, V100, A100, H100/H200, B200
FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def eval_batch(images: list[torch.Tensor], spec, resize: str, *, batched: bool | None = None) -> torch.Tensor:
    """`eval_image` of each decoded (H, W, 3) uint8 image, stacked: (N, 3, h, w) float32.

    Batched (the default on GPU), each separable pass is a matrix product over a group of images
    padded to a common size: rows and columns of per-image resampling matrices built from the same
    coefficients as `pil_resize`, restricted to the pixels the center crop keeps. With
    `resize="pillow"` the matrices hold Pillow's fixed-point weights and every pass is rounded as
    Pillow rounds it, so the result is Pillow's bit for bit: in float64 on devices where it is fast
    (every integer sum is below 2^53, so exact), elsewhere in float32 with each weight split into
    three byte-sized parts, whose products with 8-bit pixels sum exactly below 2^24 (any summation
    order, TF32 included), recombined in int64. With `resize="torch"` they hold the float weights,
    each pass rounded and clipped as torch's uint8 kernels do (within 2 grey levels of them). On CPU
    the image-by-image path is faster (torch's uint8 kernels; the gathers of `pil_resize`), and it
    is the default there."""
    device = images[0].device
    if not (device.type == "cuda" if batched is None else batched):
        return torch.stack([eval_image(image, spec, resize) for image in images])
    plans = [_plan(image.shape[0], image.shape[1], spec, resize) for image in images]
    height, width = spec.output_size
    exact, fast = resize == "pillow", _float64_is_fast(device)
    out = torch.empty(len(images), 3, height, width, dtype=torch.float32, device=device)
    for group in _groups(plans):
        members = [plans[i] for i in group]
        wide = fast or (exact and max(_taps(p, spec.interpolation) for p in members) > SPLIT_TAPS)
        out[to_device(torch.tensor(group), device)] = _resize_group([images[i] for i in group], members,
                                                                 interpolation=spec.interpolation, exact=exact,
                                                                 wide=wide).to(torch.float32)
    mean, std = _normalization(spec, device)
    return (out - mean[:, None, None]) / std[:, None, None]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device` without a host sync: torch's blocking copy from pageable
    memory waits for every kernel queued on the stream (the model's last step or forward), so the
    CPU could not queue the next work ahead of the GPU. From pinned memory the copy is queued behind
    them; torch's pinned allocator keeps the buffer until the copy has run."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _float64_is_fast(device: torch.device) -> bool:
    if FLOAT64 is not None:
        return FLOAT64
    return device.type != "cuda" or torch.cuda.get_device_capability(device) in FAST_FLOAT64


class _Plan(NamedTuple):
    """One image's resize: its size, the resized size, the crop kept and Pillow's pass order."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop_height: int
    crop_width: int
    vertical_first: bool


def _plan(height: int, width: int, spec, resize: str) -> _Plan:
    rh, rw = spec.resized_size(height, width)
    ch, cw = spec.crop or (rh, rw)
    first = resize == "pillow" and vertical_first(height, width, rh, rw)
    return _Plan(height, width, rh, rw, (rh - ch) // 2, (rw - cw) // 2, ch, cw, first)


def _taps(plan: _Plan, interpolation: str) -> int:
    """The most source pixels one output pixel of either pass sums."""
    if interpolation == "nearest":
        return 1
    return max(_coefficients(plan.height, plan.resized_height, interpolation)[0].shape[1],
               _coefficients(plan.width, plan.resized_width, interpolation)[0].shape[1])


def _groups(plans: list[_Plan]) -> list[list[int]]:
    """Images with the same pass order, largest first, in groups whose padded images fit
    GROUP_BYTES and waste at most half of it on padding."""
    order = sorted(range(len(plans)), key=lambda i: (plans[i].vertical_first, -plans[i].height * plans[i].width, i))
    groups: list[list[int]] = []
    padded = (0, 0)  # the padded size of the last group
    for i in order:
        plan = plans[i]
        if groups:
            group = groups[-1]
            hp, wp = max(padded[0], plan.height), max(padded[1], plan.width)
            if (plans[group[0]].vertical_first == plan.vertical_first
                    and (len(group) + 1) * 3 * hp * wp * 8 <= GROUP_BYTES and 2 * plan.height * plan.width >= hp * wp):
                group.append(i)
                padded = (hp, wp)
                continue
        groups.append([i])
        padded = (plan.height, plan.width)
    return groups


def _resize_group(images: list[torch.Tensor], plans: list[_Plan], *, interpolation: str, exact: bool,
                  wide: bool = True) -> torch.Tensor:
    """(G, 3, crop h, crop w) of integer values 0..255 (float64 when `wide`, else float32): both
    passes as batched matrix products."""
    device, count = images[0].device, len(images)
    hp, wp = max(p.height for p in plans), max(p.width for p in plans)
    ch, cw, first = plans[0].crop_height, plans[0].crop_width, plans[0].vertical_first
    dtype, parts = (torch.float64, 1) if wide else (torch.float32, 3 if exact else 1)
    pixels = torch.zeros(count, 3, hp, wp, dtype=dtype, device=device)
    columns = torch.zeros(count, parts, wp, cw, dtype=dtype, device=device)
    rows = torch.zeros(count, parts, ch, hp, dtype=dtype, device=device)
    for g, (image, (h, w, rh, rw, top, left, _, _, _)) in enumerate(zip(images, plans)):
        pixels[g, :, :h, :w] = image.permute(2, 0, 1)
        columns[g, :, :w] = _pass_matrices(w, rw, left, cw, interpolation, exact, parts, dtype, device)
        rows[g, :, :, :h] = _pass_matrices(h, rh, top, ch, interpolation, exact, parts, dtype, device).transpose(1, 2)

    def horizontal(x: torch.Tensor) -> torch.Tensor:  # the same matrices for the 3 channels
        return _rounded([x @ columns[:, k, None] for k in range(parts)], exact)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        return _rounded([rows[:, k, None] @ x for k in range(parts)], exact)

    return horizontal(vertical(pixels)) if first else vertical(horizontal(pixels))


def _rounded(partials: list[torch.Tensor], exact: bool) -> torch.Tensor:
    """A pass's sums rounded as Pillow rounds them ((sum + 2^21) >> 22, clipped to 8 bits), or, with
    float weights, rounded and clipped as torch's uint8 kernels do. `partials`: the sum itself
    (exact in float64, as the sums are integers below 2^53), or the sums of the weights' three
    byte-sized parts, highest first (each exact in float32), put together in int64."""
    if len(partials) == 3:
        high, middle, low = (p.to(torch.int64) for p in partials)
        total = (high << 16) + (middle << 8) + low
        return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255).to(partials[0].dtype)
    total = partials[0]
    if exact:
        return total.add_(1 << (PRECISION_BITS - 1)).mul_(2.0 ** -PRECISION_BITS).floor_().clamp_(0, 255)
    return total.round_().clamp_(0, 255)


@lru_cache(maxsize=4096)
def _pass_matrices(in_size: int, out_size: int, start: int, count: int, interpolation: str, exact: bool, parts: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(parts, in_size, count) on `device`: `_pass_matrix`, or with 3 parts its fixed-point weights
    split into bytes, highest (signed) first: weight = high x 2^16 + middle x 2^8 + low."""
    matrix = _pass_matrix(in_size, out_size, start, count, interpolation, exact)
    if parts == 3:
        weights = matrix.to(torch.int64)
        matrix = torch.stack([weights >> 16, (weights >> 8) & 255, weights & 255])
    return to_device(matrix.reshape(parts, in_size, count).to(dtype), device)


def _pass_matrix(in_size: int, out_size: int, start: int, count: int, interpolation: str, exact: bool) -> torch.Tensor:
    """(in_size, count) float64 on the CPU: output pixels start..start+count of resampling in_size to
    out_size, each column the weights of its source pixels (fixed-point when `exact`)."""
    matrix = torch.zeros(in_size, count, dtype=torch.float64)
    outputs = torch.arange(count)
    if interpolation == "nearest":
        matrix[_nearest(in_size, out_size, torch.device("cpu"))[start:start + count], outputs] = (
            float(1 << PRECISION_BITS) if exact else 1.0)
        return matrix
    indices, fixed, weights = (t[start:start + count] for t in _coefficients(in_size, out_size, interpolation))
    values = fixed.to(torch.float64) if exact else weights
    matrix.index_put_((indices.flatten(), outputs[:, None].expand_as(indices).flatten()), values.flatten(),
                      accumulate=True)
    return matrix


@lru_cache(maxsize=64)
def _normalization(spec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(spec.pixel_mean, device=device), torch.tensor(spec.pixel_std, device=device)
