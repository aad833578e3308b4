"""The detection transforms, with torchvision's v2 transforms on ``tv_tensors`` (the boxes move with the image):

* evaluation (:func:`eval_transform`): the whole image resized to ``size`` x ``size`` (bilinear, antialiased), the
  aspect ratio not kept: every batch has one static shape (as the captured step and export want), and the canvases
  are square anyway; :func:`to_original` maps boxes back to the file's pixels for COCO's evaluator;
* training (:func:`train_transform`): the same resize, then a horizontal flip with p = 0.5.

The flip's coin comes from the item's own generator (:func:`fmkt.data.transforms.item_rng`: seed, epoch, image
index), never torch's global one, so a batch does not depend on the number of workers or on which decoded what.
Images stay uint8 ``(3, H, W)``; boxes are float32 ``(n, 4)`` xyxy in pixels (exclusive ends: a box covering
columns 0..9 is x0 = 0, x1 = 10), so resizing scales them by ``size / W`` and ``size / H`` and flipping maps
``x`` to ``size - x`` exactly.
"""
from __future__ import annotations

import numpy as np
import torch

FLIP_P = 0.5


def _wrap(image: torch.Tensor, boxes: torch.Tensor):
    from torchvision import tv_tensors

    canvas = (int(image.shape[-2]), int(image.shape[-1]))
    return tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes.to(torch.float32).reshape(-1, 4),
                                                             format="XYXY", canvas_size=canvas)


def _plain(image, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    return image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)


def eval_transform(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (3, H, W) uint8 and its ``boxes`` resized to ``size`` x ``size`` together."""
    from torchvision.transforms.v2 import functional as TF

    img, bb = _wrap(image, boxes)
    return _plain(TF.resize(img, [size, size], antialias=True), TF.resize(bb, [size, size]))


def train_transform(image: torch.Tensor, boxes: torch.Tensor, size: int,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eval_transform`, then a horizontal flip of image and boxes when ``rng`` draws below ``FLIP_P``."""
    from torchvision.transforms.v2 import functional as TF

    img, bb = _wrap(image, boxes)
    img, bb = TF.resize(img, [size, size], antialias=True), TF.resize(bb, [size, size])
    if rng.random() < FLIP_P:
        img, bb = TF.horizontal_flip(img), TF.horizontal_flip(bb)
    return _plain(img, bb)


def to_original(boxes: torch.Tensor, orig_size, size: int) -> torch.Tensor:
    """xyxy ``boxes`` on the ``size`` x ``size`` network input mapped back to the image's ``orig_size`` (height,
    width): the inverse of the evaluation resize."""
    height, width = (float(v) for v in orig_size)
    scale = torch.tensor([width / size, height / size, width / size, height / size], dtype=torch.float32,
                         device=boxes.device)
    return boxes.to(torch.float32) * scale
