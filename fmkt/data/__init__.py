"""Image datasets as in-memory tensors, tensor augmentation and a seeded batch loader.

No torchvision: every dataset is parsed once into a uint8 array, cached in memory, and handed out
as fresh float32 tensors in [0, 1] (raw, *not* normalised: the model wrappers normalise inside, so
exported graphs take raw images).

Datasets: :data:`DATASET_SOURCES` below is the one list of names, read by :func:`list_datasets`,
:func:`dataset_info` and :func:`load_dataset` (``DATASETS`` and ``DEFAULT_DATA_DIRS`` are views of it):

* ``digits``        sklearn's 8x8 digits (1797 images), fixed stratified split (seed 0, 20 % test).
* ``mnist``         IDX files, default folder ``/usr/share/datasets/mnist``.
* ``fashion-mnist`` IDX files, default folder ``/usr/share/datasets/fashion-mnist``.
* ``cifar10``       the python-pickle release (``cifar-10-batches-py``).
* ``cifar100``      the python-pickle release (``cifar-100-python``), fine labels.
* ``imagefolder``   ``--data-dir ROOT`` with ``ROOT/train/CLASS/*.jpg`` and ``ROOT/val/CLASS/*.jpg`` (the ImageNet
                    layout), never held in memory: files decoded by DataLoader workers (:mod:`fmkt.data.folder`).

Any ``pkg.module:factory`` import path works wherever a name does (:mod:`fmkt.data.factory`).

Modules: ``tensors`` (DatasetInfo, ImageTensors, checks), ``sources`` (what a registry entry holds),
``digits`` / ``idx`` / ``cifar`` (one reader per file family), ``factory`` (import-path data),
``loader`` (BatchLoader and :func:`augment_batch`, seeded with explicit ``torch.Generator`` objects,
so the same seed and epoch always give the same batches), ``folder`` / ``transforms`` / ``workers`` (image
folders: the file list, the transforms on tensors, the worker loader) and :func:`make_loader`, the one way the
engine and evaluation get batches of either kind.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import torch

from fmkt.data.cifar import CIFAR10_CLASSES, CIFAR10_RELEASE, CIFAR100_CLASSES, CIFAR100_RELEASE, read_cifar
from fmkt.data.digits import DIGIT_CLASSES, DIGITS_MEAN, DIGITS_STD, read_digits
from fmkt.data.factory import load_factory_data
from fmkt.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderSet, clear_folder_cache, folder_record, \
    open_image_folder
from fmkt.data.idx import FASHION_CLASSES, read_idx, read_idx_folder
from fmkt.data.loader import BatchLoader, augment_batch
from fmkt.data.sources import DatasetSource
from fmkt.data.tensors import DatasetInfo, ImageTensors, check_images, normalize
from fmkt.data.workers import FolderLoader, make_loader, resident, shard
from fmkt.errors import FmktError
from fmkt.import_paths import is_import_path

__all__ = [
    "DatasetInfo",
    "DatasetSource",
    "ImageTensors",
    "DATASET_SOURCES",
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "clear_cache",
    "read_idx",
    "augment_batch",
    "normalize",
    "check_images",
    "BatchLoader",
    "FolderLoader",
    "ImageFolderSet",
    "make_loader",
    "shard",
    "resident",
    "folder_record",
    "check_split",
    "data_options",
    "is_folder",
]

_CIFAR_HINT = "extract the CIFAR-{n} python release (cifar-{n}-python.tar.gz) there or pass --data-dir"

#: The datasets registry: name -> facts, default folder and reader. Registering here is all a dataset needs.
DATASET_SOURCES: dict[str, DatasetSource] = {
    "digits": DatasetSource(
        DatasetInfo("digits", 10, 1, (8, 8), (DIGITS_MEAN,), (DIGITS_STD,), 1, False, DIGIT_CLASSES),
        "digits", read_digits, scale=16.0,
    ),
    "mnist": DatasetSource(
        DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), 2, False, DIGIT_CLASSES),
        "MNIST", read_idx_folder, default_dir="/usr/share/datasets/mnist",
        install_hint="put the four MNIST IDX files there or pass --data-dir",
    ),
    "fashion-mnist": DatasetSource(
        DatasetInfo("fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), 2, False, FASHION_CLASSES),
        "Fashion-MNIST", read_idx_folder, default_dir="/usr/share/datasets/fashion-mnist",
        install_hint="install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir",
    ),
    "cifar10": DatasetSource(
        DatasetInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True,
                    CIFAR10_CLASSES),
        "CIFAR-10", functools.partial(read_cifar, release=CIFAR10_RELEASE),
        default_dir="/usr/share/datasets/cifar10", install_hint=_CIFAR_HINT.format(n=10),
    ),
    "cifar100": DatasetSource(
        DatasetInfo("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True,
                    CIFAR100_CLASSES),
        "CIFAR-100", functools.partial(read_cifar, release=CIFAR100_RELEASE),
        default_dir="/usr/share/datasets/cifar100", install_hint=_CIFAR_HINT.format(n=100),
    ),
    "imagefolder": DatasetSource(
        DatasetInfo("imagefolder", 0, 3, (224, 224), IMAGENET_MEAN, IMAGENET_STD, 0, True),
        "image folder", None, opener=open_image_folder,
    ),
}

#: Views of the registry: the :class:`DatasetInfo` of each name, and where :func:`load_dataset` looks when
#: ``data_dir`` is None (``digits`` needs no folder).
DATASETS: dict[str, DatasetInfo] = {name: src.info for name, src in DATASET_SOURCES.items()}
DEFAULT_DATA_DIRS: dict[str, str] = {
    name: src.default_dir for name, src in DATASET_SOURCES.items() if src.default_dir is not None
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`dataset_info` and :func:`load_dataset`."""
    return list(DATASET_SOURCES)


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASET_SOURCES:
        raise FmktError(
            f"Unknown dataset {name!r}: expected one of {', '.join(DATASET_SOURCES)}."
        )
    return key


def is_folder(name: str) -> bool:
    """Whether ``name`` is a dataset read file by file as it trains (an image folder), not held in memory."""
    return not is_import_path(name) and DATASET_SOURCES[_canonical(name)].opener is not None


def data_options(data_cfg) -> dict:
    """The keyword options of :func:`dataset_info` / :func:`load_dataset` a config's data section sets."""
    return {"image_size": data_cfg.image_size, "workers": data_cfg.workers, "decode": data_cfg.decode,
            "mean": tuple(data_cfg.mean) or None, "std": tuple(data_cfg.std) or None}


def _with_stats(info: DatasetInfo, mean, std) -> DatasetInfo:
    """``info`` with the configured per-channel mean/std (``data.mean``/``data.std``) in place of its own."""
    for values, key in [(mean, "data.mean"), (std, "data.std")]:
        if values is not None and len(values) != info.in_channels:
            raise FmktError(f"{key} has {len(values)} values but {info.name} images have {info.in_channels} "
                            "channel(s); give one value per channel.")
    return dataclasses.replace(info, mean=tuple(map(float, mean)) if mean else info.mean,
                               std=tuple(map(float, std)) if std else info.std)


def dataset_info(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 workers: int | None = None, mean=None, std=None, decode: str = "cpu") -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive, ``_`` and ``-`` alike); ``mean``/``std`` replace
    the dataset's statistics; ``image_size``: an image folder's crop side (None: 224), or the side in-memory
    images are resized to (None: their own).

    For an import path ``pkg.module:factory`` the facts come from the data (loaded once and cached); for an image
    folder from its class folders (scanned once and cached).
    """
    if is_import_path(name):
        info = load_factory_data(name, None if data_dir is None else str(data_dir))[2]
    elif is_folder(name):
        info = DATASET_SOURCES[_canonical(name)].opener(data_dir, image_size=image_size or FOLDER_SIZE,
                                                        workers=workers)[2]
    else:
        info = DATASET_SOURCES[_canonical(name)].info
    return _with_stats(_sized_info(info, image_size, is_folder(name)), mean, std)


FOLDER_SIZE = 224  # an image folder's crop side when data.image_size is not set


def _sized_info(info: DatasetInfo, size: int | None, folder: bool) -> DatasetInfo:
    """``info`` of in-memory data resized to ``size`` x ``size`` (its crop padding scaled with it)."""
    if folder or size is None or tuple(info.image_size) == (size, size):
        return info
    pad = int(round(info.crop_padding * size / info.image_size[0]))
    return dataclasses.replace(info, image_size=(size, size), crop_padding=pad)


def resize_split(split: ImageTensors, size: int | None) -> ImageTensors:
    """An in-memory split resized once to ``size`` x ``size`` with torchvision (bilinear, antialiased), values kept
    in [0, 1]; unchanged when ``size`` is None or already its size."""
    if size is None or tuple(split.images.shape[-2:]) == (size, size):
        return split
    from torchvision.transforms.v2 import functional as TF

    images = TF.resize(split.images, [size, size], antialias=True).clamp_(0.0, 1.0)
    return ImageTensors(images.contiguous(), split.labels)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, folder: str | None) -> tuple[tuple[np.ndarray, ...], float]:
    """The registered reader's arrays (read-only) and the divisor that maps the images to [0, 1]."""
    source = DATASET_SOURCES[name]
    arrays = source.read(source, None if folder is None else Path(folder))
    frozen = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        frozen.append(a)
    return tuple(frozen), source.scale


def clear_cache() -> None:
    """Forget the parsed registered datasets held in memory and the scanned image folders (import-path data stays
    cached)."""
    _load_cached.cache_clear()
    clear_folder_cache()


def check_split(data, info: DatasetInfo) -> None:
    """An in-memory split's images checked (:func:`check_images`); an image folder's files were checked when it
    was opened, and a file that fails to decode later is skipped."""
    if isinstance(data, ImageTensors):
        check_images(data.images, info.in_channels)


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> ImageTensors:
    # torch.from_numpy would share (read-only) memory; the float conversion makes a fresh
    # tensor, so callers can never corrupt the cache.
    img = torch.from_numpy(images.astype(np.float32)).div_(scale)
    lab = torch.from_numpy(labels.astype(np.int64, copy=True))
    return ImageTensors(img, lab)


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None, workers: int | None = None,
    mean=None, std=None, decode: str = "cpu",
) -> tuple[ImageTensors, ImageTensors, DatasetInfo]:
    """Load ``name`` as ``(train, test, info)``; ``name`` may be an import path ``pkg.module:factory`` (see
    :func:`fmkt.data.factory.load_factory_data`). ``imagefolder`` gives two :class:`ImageFolderSet` (file lists,
    decoded at ``image_size`` by ``workers`` DataLoader processes) instead; in-memory data is resized to
    ``image_size`` when given (:func:`resize_split`); ``mean``/``std`` as in :func:`dataset_info`.

    ``data_dir`` defaults to :data:`DEFAULT_DATA_DIRS`; for ``cifar10``/``cifar100`` it may be the
    release folder itself (``cifar-10-batches-py``) or its parent; ``digits`` ignores it.
    Parsed files are cached per (name, folder); every call returns freshly allocated tensors.
    CIFAR batches are Python pickles and must come from a trusted source.
    Raises :class:`FmktError` for unknown names and missing or malformed files.
    """
    if is_import_path(name):
        train, test, info = load_factory_data(name, None if data_dir is None else str(data_dir))
        return (resize_split(ImageTensors(train.images.clone(), train.labels.clone()), image_size),
                resize_split(ImageTensors(test.images.clone(), test.labels.clone()), image_size),
                _with_stats(_sized_info(info, image_size, False), mean, std))
    key = _canonical(name)
    source = DATASET_SOURCES[key]
    if source.opener is not None:
        train, test, info = source.opener(data_dir, image_size=image_size or FOLDER_SIZE, workers=workers,
                                          decode=decode)
        return train, test, _with_stats(info, mean, std)
    folder: str | None = None
    if source.default_dir is not None:
        folder = str(Path(data_dir if data_dir is not None else source.default_dir).expanduser().resolve())
    (tr_x, tr_y, te_x, te_y), scale = _load_cached(key, folder)
    return (resize_split(_to_tensors(tr_x, tr_y, scale), image_size),
            resize_split(_to_tensors(te_x, te_y, scale), image_size),
            _with_stats(_sized_info(source.info, image_size, False), mean, std))
