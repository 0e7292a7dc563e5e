"""Crop geometry on uint8 images, the part of every view that runs in the data workers.

An image is decoded once; every crop is a strided view of it, resized by torch's uint8
antialiased kernels on a channels-last layout (the fastest path measured on these machines:
~0.56 ms for a 300 px → 224 px crop, against 1.4 ms for PIL's resize with a box).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (log-uniform); ten tries, then the largest centred crop with a ratio inside `ratio`.
    The sampling rule of Inception-style RandomResizedCrop, which all the papers use."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    current = width / height
    if current < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif current > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def as_batch(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] → [1, C, H, W] in channels-last memory (a view when the image came from HWC)."""
    return image.unsqueeze(0).contiguous(memory_format=torch.channels_last)


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int, mode: str = "bilinear",
                flip: bool = False) -> torch.Tensor:
    """Crop `box` = (top, left, h, w) of a [1, C, H, W] uint8 image, resize to size × size → [C, S, S]."""
    top, left, h, w = box
    region = image[:, :, top : top + h, left : left + w]
    if (h, w) != (size, size):
        region = F.interpolate(region, size=(size, size), mode=mode, antialias=mode != "nearest")
    out = region[0]
    return out.flip(-1) if flip else out


def resize_short_side(image: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """[1, C, H, W] → the short side becomes `size` (aspect kept)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    if scale == 1:
        return image
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    return F.interpolate(image, size=target, mode=mode, antialias=scale < 1 and mode != "nearest")


def center_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    return (height - size) // 2, (width - size) // 2, size, size


def random_box(height: int, width: int, size: int, rng: random.Random) -> tuple[int, int, int, int]:
    return rng.randint(0, height - size), rng.randint(0, width - size), size, size


def patch_grid(image: torch.Tensor, grid: int, patch: int, jitter: int, rng: random.Random) -> torch.Tensor:
    """CPC's patches: a grid × grid of overlapping `patch` px squares (stride patch / 2) from a
    [1, C, S, S] image; each patch is a random (patch − jitter) px sub-crop, zero-padded back to
    `patch` at a random offset, so patch borders cannot be matched. → [grid², C, patch, patch]."""
    stride = patch // 2
    channels = image.shape[1]
    inner = patch - jitter
    out = torch.zeros((grid * grid, channels, patch, patch), dtype=image.dtype)
    for row in range(grid):
        for col in range(grid):
            top, left = row * stride + rng.randint(0, jitter), col * stride + rng.randint(0, jitter)
            dy, dx = rng.randint(0, jitter), rng.randint(0, jitter)
            out[row * grid + col, :, dy : dy + inner, dx : dx + inner] = image[0, :, top : top + inner,
                                                                               left : left + inner]
    return out
