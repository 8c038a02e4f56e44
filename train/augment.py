"""Batch augmentations on the device, after the DALI graph: random erasing of each image, then
mixup or cutmix across the batch (which mixes the targets too)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ERASE_AREA = (0.02, 1 / 3)  # of the image, as timm's RandomErasing and the DeiT, ConvNeXt and Swin recipes
ERASE_RATIO = (0.3, 1 / 0.3)  # height / width, drawn log-uniformly
ERASE_ATTEMPTS = 10


def erase_batch(pixels: torch.Tensor, *, prob: float) -> torch.Tensor:
    """Random erasing (Zhong et al., 2017) as timm's RandomErasing does it in its "pixel" mode,
    one box: each image, with probability `prob`, gets a box of ERASE_AREA of its area and aspect
    ratio ERASE_RATIO at a uniform position, filled with normal noise (the pixels are normalized);
    the first of ERASE_ATTEMPTS draws that fits in the image, none when none fits. On the batch's
    device from torch's random stream there (a resumed run's, with the rest of its state): no host
    sync."""
    if not prob:
        return pixels
    batch, _, height, width = pixels.shape
    device = pixels.device
    draws = torch.rand(batch, ERASE_ATTEMPTS, 4, device=device)  # area, log aspect, top, left
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draws[..., 0]) * (height * width)
    low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(low + (high - low) * draws[..., 1])
    tall, wide = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (tall < height) & (wide < width)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits (0 where none does: not erased)
    tall, wide, y, x = (t.gather(1, first).squeeze(1) for t in (tall, wide, draws[..., 2], draws[..., 3]))
    top, left = (y * (height - tall + 1)).floor(), (x * (width - wide + 1)).floor()
    erased = (torch.rand(batch, device=device) < prob) & fits.any(1)
    rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + tall)[:, None])
    in_columns = (columns >= left[:, None]) & (columns < (left + wide)[:, None])
    box = in_rows[:, :, None] & in_columns[:, None, :] & erased[:, None, None]
    return torch.where(box[:, None], torch.randn_like(pixels), pixels)


def mix_batch(pixels: torch.Tensor, labels: torch.Tensor, *, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one per batch, chosen at random when both are on), on the batch's device.
    Returns the pixels and the targets: class ids, or class probabilities when mixed."""
    if not mixup_alpha and not cutmix_alpha:
        return pixels, labels
    use_cutmix = bool(cutmix_alpha) and (not mixup_alpha or rng.random() < 0.5)
    lam = float(rng.beta(*(2 * [cutmix_alpha if use_cutmix else mixup_alpha])))
    partner = pixels.flip(0)
    if use_cutmix:  # paste a box of area (1 - lam) from the partner image; lam follows the clipped box
        height, width = pixels.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        pixels = pixels.clone()
        pixels[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)
    else:
        pixels = pixels * lam + partner * (1 - lam)
    one_hot = F.one_hot(labels, num_classes).float()
    return pixels, one_hot * lam + one_hot.flip(0) * (1 - lam)
