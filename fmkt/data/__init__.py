"""Image datasets as in-memory tensors, tensor augmentation and a seeded batch loader.

Every in-memory dataset is parsed once into a uint8 array, cached in memory, and handed out
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

One dataset interface (:class:`fmkt.data.split.Split`): every split, whatever its kind, says how long it is, how it is
subset, split and sharded, where it lives (``resident``: in memory, movable to the GPU whole, or on the host), which
loader batches it, what fmkt.json records of it and which images export parity feeds the exported graph; a registry
entry names its kind (``DatasetSource.kind``), whose ``open`` / ``describe`` read it. The kinds: ``ImageTensors``
(``tensors``) and ``ImageFolderSet`` (``folder``). A new kind is one ``Split`` subclass and its registry entries.

Modules: ``split`` (the interface), ``tensors`` (DatasetInfo, ImageTensors, checks), ``sources`` (what a registry
entry holds), ``digits`` / ``idx`` / ``cifar`` (one reader per file family), ``factory`` (import-path data),
``loader`` (:class:`EpochSampler`, every loader's epoch/shuffle/shard/skip; BatchLoader and :func:`augment_batch`,
seeded with explicit ``torch.Generator`` objects, so the same seed and epoch always give the same batches),
``folder`` / ``transforms`` / ``workers`` (image folders: the file list, the transforms on tensors, the worker
loader) and :func:`make_loader`, the one way the engine and evaluation get batches of any kind.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from fmkt.data.cifar import CIFAR10_CLASSES, CIFAR10_RELEASE, CIFAR100_CLASSES, CIFAR100_RELEASE, read_cifar
from fmkt.data.deit_aug import PerImage, per_image_options
from fmkt.data.digits import DIGIT_CLASSES, DIGITS_MEAN, DIGITS_STD, read_digits
from fmkt.data.factory import load_factory_data
from fmkt.data.folder import FOLDER_SIZE, IMAGENET_MEAN, IMAGENET_STD, ImageFolderSet, clear_folder_cache
from fmkt.data.idx import FASHION_CLASSES, read_idx, read_idx_folder
from fmkt.data.loader import BatchLoader, EpochSampler, augment_batch
from fmkt.data.sources import DatasetSource
from fmkt.data.split import Split
from fmkt.data.tensors import DatasetInfo, ImageTensors, check_images, clear_tensor_cache, normalize, \
    resize_split, sized_info
from fmkt.data.workers import FolderLoader
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
    "EpochSampler",
    "FolderLoader",
    "ImageFolderSet",
    "Split",
    "make_loader",
    "recorded_splits",
    "data_options",
    "FOLDER_SIZE",
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
        "image folder", None, kind=ImageFolderSet,
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


def data_options(data_cfg) -> dict:
    """The keyword options of :func:`dataset_info` / :func:`load_dataset` a config's data section sets."""
    return {"image_size": data_cfg.image_size, "workers": data_cfg.workers, "decode": data_cfg.decode,
            "mean": tuple(data_cfg.mean) or None, "std": tuple(data_cfg.std) or None,
            "per_image": per_image_options(data_cfg)}


def _with_stats(info: DatasetInfo, mean, std) -> DatasetInfo:
    """``info`` with the configured per-channel mean/std (``data.mean``/``data.std``) in place of its own."""
    for values, key in [(mean, "data.mean"), (std, "data.std")]:
        if values is not None and len(values) != info.in_channels:
            raise FmktError(f"{key} has {len(values)} values but {info.name} images have {info.in_channels} "
                            "channel(s); give one value per channel.")
    return dataclasses.replace(info, mean=tuple(map(float, mean)) if mean else info.mean,
                               std=tuple(map(float, std)) if std else info.std)


def dataset_info(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 workers: int | None = None, mean=None, std=None, decode: str = "cpu", per_image=None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive, ``_`` and ``-`` alike); ``mean``/``std`` replace
    the dataset's statistics; ``image_size``: an image folder's crop side (None: 224), or the side in-memory
    images are resized to (None: their own).

    For an import path ``pkg.module:factory`` the facts come from the data (loaded once and cached); for a registered
    name from its kind's :meth:`Split.describe` (an image folder's from its class folders, scanned once and cached).
    """
    if is_import_path(name):
        info = sized_info(load_factory_data(name, None if data_dir is None else str(data_dir))[2], image_size)
    else:
        source = DATASET_SOURCES[_canonical(name)]
        info = source.kind.describe(source, data_dir, image_size=image_size, workers=workers)
    return _with_stats(info, mean, std)


def clear_cache() -> None:
    """Forget the parsed registered datasets held in memory and the scanned image folders (import-path data stays
    cached)."""
    clear_tensor_cache()
    clear_folder_cache()


def make_loader(data: Split, batch_size: int, shuffle: bool = False, augment_info=None, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, device=None):
    """The loader of ``data``, whatever its kind (:meth:`Split.loader`: a :class:`BatchLoader` for
    :class:`ImageTensors`, a :class:`FolderLoader` for an image folder); augmentation on when ``augment_info`` is
    given."""
    return data.loader(batch_size, shuffle=shuffle, augment_info=augment_info, seed=seed, drop_last=drop_last,
                       rank=rank, world_size=world_size, device=device)


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None, workers: int | None = None,
    mean=None, std=None, decode: str = "cpu", per_image: PerImage | None = None,
) -> tuple[ImageTensors, ImageTensors, DatasetInfo]:
    """Load ``name`` as ``(train, test, info)``; ``name`` may be an import path ``pkg.module:factory`` (see
    :func:`fmkt.data.factory.load_factory_data`). ``imagefolder`` gives two :class:`ImageFolderSet` (file lists,
    decoded at ``image_size`` by ``workers`` DataLoader processes) instead; in-memory data is resized to
    ``image_size`` when given (:func:`resize_split`); ``mean``/``std`` as in :func:`dataset_info`; ``per_image``:
    an image folder's DeiT augmentation (:class:`fmkt.data.deit_aug.PerImage`, None: off), which its training
    loader applies.

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
                _with_stats(sized_info(info, image_size), mean, std))
    source = DATASET_SOURCES[_canonical(name)]
    train, test, info = source.kind.open(source, data_dir, image_size=image_size, workers=workers, decode=decode,
                                         per_image=per_image)
    return train, test, _with_stats(info, mean, std)


def recorded_splits(name: str, data_dir, size, recorded: dict) -> tuple[Split, Split, DatasetInfo]:
    """``load_dataset`` of the data an artifact was trained on, as its fmkt.json records it (``recorded``: its
    ``dataset``; {} for another dataset): read from ``data_dir``, else the folder it records (``dir``, an image
    folder's), else the dataset's default; at the artifact's input ``size`` (H, W), square as ``data.image_size``
    makes it (in-memory images resized, an image folder's crop side); the recorded class names, by name and order,
    must be the data's."""
    height, width = size
    folder = data_dir or recorded.get("dir")
    train, test, found = load_dataset(name, folder, image_size=height if height == width else None)
    names = recorded.get("class_names")
    if names and found.class_names is not None and list(found.class_names) != list(names):
        where = name if folder is None else f"{name} at {folder}"
        raise FmktError(f"the classes of {where} are not the {len(names)} classes the artifact was trained on (by "
                        "name and order); evaluate on data with the same classes.")
    return train, test, found
