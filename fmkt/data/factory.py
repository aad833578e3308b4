"""A user's data by import path (``--data pkg.module:factory``): the factory's ``(train, test)`` datasets read
once into :class:`ImageTensors`, with a :class:`DatasetInfo` computed from them."""

from __future__ import annotations

import functools

import numpy as np
import torch

from fmkt.data.tensors import DatasetInfo, ImageTensors
from fmkt.errors import FmktError, first_line
from fmkt.import_paths import call_factory


@functools.lru_cache(maxsize=4)
def load_factory_data(path: str, data_dir: str | None) -> tuple[ImageTensors, ImageTensors, DatasetInfo]:
    """A user's data: ``factory(data_dir=...)`` (data_dir passed when it takes it) returns ``(train, test)``
    map-style datasets of ``(image, label)``: images (C, H, W) (or (H, W)) float in [0, 1], labels ints.

    Read once into memory and cached (random transforms inside the datasets are therefore applied once, not per
    epoch); callers clone before handing the tensors out.
    Classes: ``len(train.classes)`` when the dataset has ``classes``, else the largest label + 1; channels and
    size from the images; mean/std per channel from the train split; no augmentation (crop 0, no flip).
    """
    out = call_factory(path, "data factory", data_dir=data_dir)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise FmktError(f"data factory {path!r} returned {type(out).__name__}; it must return (train, test) datasets.")
    train, test = (_split_tensors(ds, path, split) for ds, split in zip(out, ("train", "test")))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise FmktError(f"data factory {path!r}: train images are {tuple(train.images.shape[1:])} but test images "
                        f"are {tuple(test.images.shape[1:])}; both splits must have one (C, H, W).")
    names = getattr(out[0], "classes", None)
    top = int(max(train.labels.max(), test.labels.max())) + 1
    classes = len(names) if names is not None else top
    if top > classes:
        raise FmktError(f"data factory {path!r}: labels go up to {top - 1} but the train set names {classes} classes.")
    x = train.images
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    info = DatasetInfo(path, classes, int(x.shape[1]), (int(x.shape[2]), int(x.shape[3])),
                       tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std), 0, False,
                       tuple(map(str, names)) if names is not None else None)
    return train, test, info


def _stack_items(ds, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a map-style dataset of ``(image, label)``, read item by item (or its tensors)."""
    try:
        n = len(ds)
    except TypeError:
        raise FmktError(f"{what} is a {type(ds).__name__}; it must be a map-style dataset (len and "
                        "indexing) of (image, label).") from None
    if n == 0:
        raise FmktError(f"{what} is empty.")
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[0], ds.tensors[1]
    items = [ds[i] for i in range(n)]
    if not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
        raise FmktError(f"{what} must yield (image, label) pairs.")
    try:
        pics = [torch.as_tensor(np.asarray(it[0]), dtype=torch.float32) for it in items]
        pics = [p[None] if p.dim() == 2 else p for p in pics]
        return torch.stack(pics), torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FmktError(f"{what} must yield (image, label) with images of one shape (C, H, W) and integer "
                        f"labels ({first_line(exc, 120, with_type=False)}).") from None


def _split_tensors(ds, path: str, split: str) -> ImageTensors:
    """One split returned by the factory (an :class:`ImageTensors` or a dataset), checked, as ImageTensors."""
    what = f"the {split} set of data factory {path!r}"
    if isinstance(ds, ImageTensors):
        images, labels = ds.images, ds.labels
    else:
        images, labels = _stack_items(ds, what)
    images = torch.as_tensor(images, dtype=torch.float32)
    images = images[:, None] if images.dim() == 3 else images
    labels = torch.as_tensor(labels).long().flatten()
    if images.dim() != 4 or len(labels) != len(images):
        raise FmktError(f"{what} must hold images (C, H, W) and one integer label per image.")
    if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
        raise FmktError(f"{what} has pixel values outside [0, 1]: give raw images in [0, 1] (the normalisation "
                        "is computed from the train split and folded into the model).")
    if labels.min() < 0:
        raise FmktError(f"{what} has negative labels; labels must be 0 .. classes - 1.")
    return ImageTensors(images.contiguous(), labels.contiguous())
