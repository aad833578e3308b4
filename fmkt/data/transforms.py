"""Decoding and the ImageNet transforms, on tensors (no torchvision): what a DataLoader worker does to one file.

* :func:`decode_rgb`: Pillow opens the file and converts it to RGB (grey, palette and CMYK images are converted, an
  alpha channel is dropped), as ``(H, W, 3)`` uint8.
* training (:func:`train_crop`): torchvision's ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``
  with its algorithm (:func:`random_resized_box`: 10 tries of a random area and log-uniform aspect ratio, then the
  central crop clamped to the ratio range), bilinear resize with antialiasing, then a horizontal flip with p = 0.5;
* evaluation (:func:`eval_crop`): resize the shorter side to ``floor(size / 0.875)`` (256 for 224), bilinear with
  antialiasing, then the central ``size x size`` crop (torchvision's ``Resize`` + ``CenterCrop`` arithmetic).

Randomness comes from a ``numpy.random.Generator`` the caller seeds per item (:func:`item_rng`: seed, epoch and
item index), so a crop never depends on which worker decoded the file or on the order they finished. Images stay
uint8 until the batch reaches its device; the resize runs on the channels-last uint8 view Pillow hands over.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: File endings read as images (case-insensitive): torchvision's ImageFolder list.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SCALE = (0.08, 1.0)  # RandomResizedCrop: the crop's area as a fraction of the image's
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and its aspect ratio (width / height)
EVAL_CROP = 0.875  # evaluation: the centre crop is this fraction of the resized shorter side
_MASK = (1 << 64) - 1


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one item's random draws in one epoch (``stream`` 1: the choice of a replacement)."""
    return np.random.default_rng([int(seed) & _MASK, int(epoch) & _MASK, int(index) & _MASK, int(stream)])


def decode_rgb(path: str) -> torch.Tensor:
    """The image file at ``path`` as ``(H, W, 3)`` uint8 RGB. Raises whatever Pillow raises for a file it cannot
    read (not an image, truncated, too large); the caller decides what a bad file means."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True))


def random_resized_box(height: int, width: int, rng, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params`` with ``rng`` (a
    ``numpy.random.Generator``) in place of torch's global generator."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_shorter_side(height: int, width: int, short: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the shorter side to ``short`` (the longer one truncated: torchvision's Resize)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_box(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of the central ``size x size`` crop (torchvision's CenterCrop rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its central ``size`` crop (256 for 224)."""
    return int(size / EVAL_CROP)


def resize(chw: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of a ``(3, h, w)`` uint8 image (any strides) to ``(3, *out_hw)`` uint8."""
    x = chw[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=tuple(out_hw), mode="bilinear", antialias=True, align_corners=False)[0]


def train_crop(hwc: torch.Tensor, size: int, rng) -> torch.Tensor:
    """RandomResizedCrop to ``size x size`` then a horizontal flip with p = 0.5: ``(3, size, size)`` uint8."""
    top, left, h, w = random_resized_box(hwc.shape[0], hwc.shape[1], rng)
    out = resize(hwc.permute(2, 0, 1)[:, top:top + h, left:left + w], (size, size))
    return out.flip(-1) if rng.random() < 0.5 else out


def eval_crop(hwc: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``eval_resize(size)``, then the central ``size x size``: ``(3, size, size)``."""
    h, w = resized_shorter_side(hwc.shape[0], hwc.shape[1], eval_resize(size))
    out = resize(hwc.permute(2, 0, 1), (h, w))
    top, left = center_box(h, w, size)
    return out[:, top:top + size, left:left + size]
