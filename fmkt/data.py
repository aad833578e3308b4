"""Image datasets as in-memory tensors, tensor augmentation and a seeded batch loader.

No torchvision: every dataset is parsed once into a uint8 array, cached in memory, and handed out
as fresh float32 tensors in [0, 1] (raw, *not* normalised: the model wrappers normalise inside, so
exported graphs take raw images).

Datasets (see :data:`DATASETS`):

* ``digits``        sklearn's 8x8 digits (1797 images), fixed stratified split (seed 0, 20 % test).
* ``mnist``         IDX files, default folder ``/usr/share/datasets/mnist``.
* ``fashion-mnist`` IDX files, default folder ``/usr/share/datasets/fashion-mnist``.
* ``cifar10``       the python-pickle release (``cifar-10-batches-py``).
* ``cifar100``      the python-pickle release (``cifar-100-python``), fine labels.

Augmentation (:func:`augment_batch`) and batching (:class:`BatchLoader`) run on tensors with
explicit ``torch.Generator`` objects, so the same seed and epoch always give the same batches.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmkt.errors import FmktError
from fmkt.imports import is_import_path

__all__ = [
    "DatasetInfo",
    "ImageTensors",
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "clear_cache",
    "read_idx",
    "augment_batch",
    "normalize",
    "check_images",
    "BatchLoader",
]


# --------------------------------------------------------------------------------------------
# Dataset descriptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``mean``/``std`` are per-channel statistics of the raw [0, 1] images (used by :func:`normalize`
    and the model wrappers); ``crop_padding`` is the zero padding of the random crop (0 = none);
    ``hflip`` turns on random horizontal flips with p = 0.5.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool
    class_names: tuple[str, ...] | None = None


_DIGIT_NAMES = tuple(str(i) for i in range(10))
_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# The fine label names of CIFAR-100 in label order (the release's `meta` file lists them sorted).
_CIFAR100_NAMES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
assert len(_CIFAR100_NAMES) == 100

# digits: statistics of the fixed train split (1437 images, values /16), computed once with
# `load_dataset("digits")[0].images.mean() / .std()` and pinned here (0.305383, 0.376119).
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.3761

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", 10, 1, (8, 8), (DIGITS_MEAN,), (DIGITS_STD,), 1, False, _DIGIT_NAMES
    ),
    "mnist": DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), 2, False, _DIGIT_NAMES),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), 2, False, _FASHION_NAMES
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, (32, 32),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True, _CIFAR10_NAMES,
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, (32, 32),
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True, _CIFAR100_NAMES,
    ),
}

#: Where :func:`load_dataset` looks when ``data_dir`` is None (``digits`` needs no folder).
DEFAULT_DATA_DIRS: dict[str, str] = {
    "mnist": "/usr/share/datasets/mnist",
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "/usr/share/datasets/cifar10",
    "cifar100": "/usr/share/datasets/cifar100",
}

_PRETTY = {
    "digits": "digits",
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}

_INSTALL_HINT = {
    "mnist": "put the four MNIST IDX files there or pass --data-dir",
    "fashion-mnist": "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir",
    "cifar10": "extract the CIFAR-10 python release (cifar-10-python.tar.gz) there "
    "or pass --data-dir",
    "cifar100": "extract the CIFAR-100 python release (cifar-100-python.tar.gz) there "
    "or pass --data-dir",
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`dataset_info` and :func:`load_dataset`."""
    return list(DATASETS)


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise FmktError(
            f"Unknown dataset {name!r}: expected one of {', '.join(DATASETS)}."
        )
    return key


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (case-insensitive, ``_`` and ``-`` alike).

    For an import path ``pkg.module:factory`` the facts come from the data (loaded once and cached).
    """
    if is_import_path(name):
        return _load_factory(name, None if data_dir is None else str(data_dir))[2]
    return DATASETS[_canonical(name)]


# --------------------------------------------------------------------------------------------
# In-memory image tensors
# --------------------------------------------------------------------------------------------


@dataclass
class ImageTensors:
    """A whole split in memory.

    ``images``: float32 (N, C, H, W) in [0, 1], raw (not normalised).
    ``labels``: int64 (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise FmktError(
                f"ImageTensors.images has shape {tuple(self.images.shape)}: expected (N, C, H, W)."
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise FmktError(
                f"ImageTensors.labels has shape {tuple(self.labels.shape)}: expected "
                f"({self.images.shape[0]},), one label per image."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> "ImageTensors":
        """A seeded, class-stratified subset of ``n`` items (all items, copied, if n >= len).

        Stratification: each class keeps about ``n * class_count / len`` items (within one);
        which items is decided by a ``torch.Generator`` seeded with ``seed``. The result keeps
        the original order of the chosen items and owns its tensors.
        """
        total = len(self)
        if n < 0:
            raise FmktError(f"subset size {n} is negative: expected a count >= 0.")
        if n >= total:
            return ImageTensors(self.images.clone(), self.labels.clone())
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(total, generator=gen)
        labels = self.labels[perm]
        # Rank of every permuted item within its class, then its fractional position
        # (rank + 0.5) / class_count: taking the n smallest positions takes each class in
        # proportion to its size, the seeded permutation deciding which members.
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank_sorted = torch.arange(total) - torch.repeat_interleave(starts, counts)
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        count_of = torch.repeat_interleave(counts, counts)
        count = torch.empty_like(count_of)
        count[order] = count_of
        key = (rank.double() + 0.5) / count.double()
        chosen = perm[torch.argsort(key, stable=True)[:n]]
        chosen, _ = torch.sort(chosen)
        return ImageTensors(self.images[chosen], self.labels[chosen])


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise FmktError(
            f"Cannot read {path} ({e}): expected a readable IDX file, gzipped or raw; "
            "re-download it or pass --data-dir."
        ) from None


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (``.gz`` or raw) into a numpy array.

    Header: two zero bytes, a dtype code (0x08 = uint8, ...), the number of dimensions, then each
    dimension as a big-endian uint32; the data follows in C order. The header and the file length
    are validated; any mismatch raises :class:`FmktError` naming ``path``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise FmktError(
            f"{path} is too short ({len(raw)} bytes) to be an IDX file: expected a 4-byte magic "
            "number and dimensions; re-download it or pass --data-dir."
        )
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    want = f"0x000008{expected_ndim:02X}" if expected_ndim is not None else "0x000008NN"
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0 or (
        expected_ndim is not None and ndim != expected_ndim
    ):
        raise FmktError(
            f"{path} has magic number 0x{magic:08X}, expected {want} (an IDX file with "
            f"{expected_ndim if expected_ndim is not None else 'some'} dimensions); "
            "re-download it or pass --data-dir."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FmktError(
            f"{path} is truncated inside its header: expected {header} header bytes; "
            "re-download it or pass --data-dir."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise FmktError(
            f"{path} has {len(raw)} bytes but its header {tuple(dims)} needs {expected}: "
            "expected an intact IDX file; re-download it or pass --data-dir."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else arr


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _not_found(name: str, folder: Path, expected: str) -> FmktError:
    return FmktError(
        f"{_PRETTY[name]} not found in {folder}: expected {expected} there; {_INSTALL_HINT[name]}."
    )


def _load_idx_folder(name: str, folder: Path) -> tuple[np.ndarray, ...]:
    expected = ", ".join(f"{f}(.gz)" for f in _IDX_FILES.values())
    if not folder.is_dir():
        raise _not_found(name, folder, expected)
    paths: dict[str, Path] = {}
    for key, base in _IDX_FILES.items():
        for cand in (folder / base, folder / f"{base}.gz"):
            if cand.is_file():
                paths[key] = cand
                break
        else:
            raise _not_found(name, folder, expected)
    info = DATASETS[name]
    out = []
    for split in ("train", "test"):
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(img_path, expected_ndim=3)
        labels = read_idx(lab_path, expected_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise FmktError(
                f"{img_path} / {lab_path} do not hold unsigned bytes: expected uint8 IDX files "
                f"of {_PRETTY[name]}; re-download them or pass --data-dir."
            )
        if tuple(images.shape[1:]) != info.image_size:
            raise FmktError(
                f"{img_path} holds {images.shape[1]}x{images.shape[2]} images: expected "
                f"{info.image_size[0]}x{info.image_size[1]} {_PRETTY[name]} images; "
                "check --data-dir."
            )
        if labels.shape[0] != images.shape[0]:
            raise FmktError(
                f"{lab_path} has {labels.shape[0]} labels but {img_path} has {images.shape[0]} "
                "images: expected one label per image; re-download them or pass --data-dir."
            )
        _check_label_range(labels, info.num_classes, lab_path)
        out += [images[:, None], labels]
    return tuple(out)


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise FmktError(
            f"{path} has labels in [{labels.min()}, {labels.max()}]: expected labels in "
            f"[0, {num_classes - 1}]; re-download it or pass --data-dir."
        )


_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


def _resolve_cifar_folder(name: str, data_dir: Path) -> Path:
    sub, train_files, test_files, _ = _CIFAR_LAYOUT[name]
    needed = train_files + test_files
    for cand in (data_dir / sub, data_dir):
        if cand.is_dir() and all((cand / f).is_file() for f in needed):
            return cand
    raise _not_found(name, data_dir, f"{sub}/ with {', '.join(needed)} (or those files directly)")


def _read_cifar_pickle(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, ...]:
    # The standard CIFAR release is a Python pickle: it must come from a trusted source, since
    # unpickling untrusted data can execute arbitrary code.
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise FmktError(
            f"Cannot unpickle {path} ({type(e).__name__}): expected a batch file of the CIFAR "
            "python release; re-download it or pass --data-dir."
        ) from None
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        raise FmktError(
            f"{path} lacks the keys b'data' and {label_key!r}: expected a batch file of the CIFAR "
            "python release; re-download it or pass --data-dir."
        )
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise FmktError(
            f"{path} holds b'data' of shape {data.shape} and dtype {data.dtype}: expected uint8 "
            "of shape (N, 3072); re-download it or pass --data-dir."
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise FmktError(
            f"{path} holds {labels.shape} labels for {data.shape[0]} images: expected one label "
            "per image; re-download it or pass --data-dir."
        )
    _check_label_range(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar(name: str, data_dir: Path) -> tuple[np.ndarray, ...]:
    folder = _resolve_cifar_folder(name, data_dir)
    _, train_files, test_files, key = _CIFAR_LAYOUT[name]
    ncls = DATASETS[name].num_classes
    out = []
    for files in (train_files, test_files):
        parts = [_read_cifar_pickle(folder / f, key, ncls) for f in files]
        out += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
    return tuple(out)


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # values 0..16
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    tr, te = np.sort(tr), np.sort(te)
    return images[tr], labels[tr], images[te], labels[te]


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, folder: str | None) -> tuple[tuple[np.ndarray, ...], float]:
    """Parsed uint8 arrays (read-only) and the divisor that maps them to [0, 1]."""
    if name == "digits":
        arrays, scale = _load_digits(), 16.0
    elif name in ("mnist", "fashion-mnist"):
        arrays, scale = _load_idx_folder(name, Path(folder)), 255.0
    else:
        arrays, scale = _load_cifar(name, Path(folder)), 255.0
    frozen = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        frozen.append(a)
    return tuple(frozen), scale


def clear_cache() -> None:
    """Forget the parsed datasets held in memory."""
    _load_cached.cache_clear()


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> ImageTensors:
    # torch.from_numpy would share (read-only) memory; the float conversion makes a fresh
    # tensor, so callers can never corrupt the cache.
    img = torch.from_numpy(images.astype(np.float32)).div_(scale)
    lab = torch.from_numpy(labels.astype(np.int64, copy=True))
    return ImageTensors(img, lab)


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None
) -> tuple[ImageTensors, ImageTensors, DatasetInfo]:
    """Load ``name`` as ``(train, test, info)``; ``name`` may be an import path ``pkg.module:factory`` (see
    :func:`_load_factory`).

    ``data_dir`` defaults to :data:`DEFAULT_DATA_DIRS`; for ``cifar10``/``cifar100`` it may be the
    release folder itself (``cifar-10-batches-py``) or its parent; ``digits`` ignores it.
    Parsed files are cached per (name, folder); every call returns freshly allocated tensors.
    CIFAR batches are Python pickles and must come from a trusted source.
    Raises :class:`FmktError` for unknown names and missing or malformed files.
    """
    if is_import_path(name):
        train, test, info = _load_factory(name, None if data_dir is None else str(data_dir))
        return (ImageTensors(train.images.clone(), train.labels.clone()),
                ImageTensors(test.images.clone(), test.labels.clone()), info)
    key = _canonical(name)
    folder: str | None = None
    if key != "digits":
        folder = str(Path(data_dir if data_dir is not None else DEFAULT_DATA_DIRS[key])
                     .expanduser().resolve())
    (tr_x, tr_y, te_x, te_y), scale = _load_cached(key, folder)
    return _to_tensors(tr_x, tr_y, scale), _to_tensors(te_x, te_y, scale), DATASETS[key]


@functools.lru_cache(maxsize=4)
def _load_factory(path: str, data_dir: str | None) -> tuple[ImageTensors, ImageTensors, DatasetInfo]:
    """A user's data: ``factory(data_dir=...)`` (data_dir passed when it takes it) returns ``(train, test)``
    map-style datasets of ``(image, label)``: images (C, H, W) (or (H, W)) float in [0, 1], labels ints.

    Read once into memory (random transforms inside the datasets are therefore applied once, not per epoch).
    Classes: ``len(train.classes)`` when the dataset has ``classes``, else the largest label + 1; channels and
    size from the images; mean/std per channel from the train split; no augmentation (crop 0, no flip).
    """
    from fmkt.imports import call_factory

    out = call_factory(path, "data factory", data_dir=data_dir)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise FmktError(f"data factory {path!r} returned {type(out).__name__}; it must return (train, test) datasets.")
    train, test = (_factory_split(ds, path, split) for ds, split in zip(out, ("train", "test")))
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


def _factory_split(ds, path: str, split: str) -> ImageTensors:
    what = f"the {split} set of data factory {path!r}"
    if isinstance(ds, ImageTensors):
        images, labels = ds.images, ds.labels
    else:
        try:
            n = len(ds)
        except TypeError:
            raise FmktError(f"{what} is a {type(ds).__name__}; it must be a map-style dataset (len and "
                            "indexing) of (image, label).") from None
        if n == 0:
            raise FmktError(f"{what} is empty.")
        if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
            images, labels = ds.tensors[0], ds.tensors[1]
        else:
            items = [ds[i] for i in range(n)]
            if not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
                raise FmktError(f"{what} must yield (image, label) pairs.")
            try:
                pics = [torch.as_tensor(np.asarray(it[0]), dtype=torch.float32) for it in items]
                pics = [p[None] if p.dim() == 2 else p for p in pics]
                images = torch.stack(pics)
                labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise FmktError(f"{what} must yield (image, label) with images of one shape (C, H, W) and integer "
                                f"labels ({str(exc).splitlines()[0][:120]}).") from None
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


# --------------------------------------------------------------------------------------------
# Tensor transforms
# --------------------------------------------------------------------------------------------


def check_images(
    images: torch.Tensor, in_channels: int | None = None, what: str = "images"
) -> None:
    """Raise :class:`FmktError` unless ``images`` is a finite (N, C, H, W) batch.

    ``in_channels``: the expected channel count; None accepts 1 (grey) or 3 (RGB).
    ``what`` names the batch in the message (e.g. a file path).
    """
    if images.dim() != 4:
        raise FmktError(f"{what} have shape {tuple(images.shape)}: expected (N, C, H, W).")
    allowed = (in_channels,) if in_channels is not None else (1, 3)
    if images.shape[1] not in allowed:
        raise FmktError(
            f"{what} have {images.shape[1]} channels: expected "
            f"{' or '.join(map(str, allowed))} in dimension 1 of (N, C, H, W)."
        )
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise FmktError(f"{what} contain NaN or Inf values: expected finite pixel values.")


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for (N, C, H, W) or (C, H, W) float images."""
    c = images.shape[-3] if images.dim() >= 3 else -1
    if c != info.in_channels:
        raise FmktError(
            f"images have shape {tuple(images.shape)}: expected {info.in_channels} channel(s) "
            f"in dimension -3 for {info.name}."
        )
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean) / std


def augment_batch(
    images: torch.Tensor, info: DatasetInfo, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (zero padding ``info.crop_padding``) then, if ``info.hflip``, flip with p=0.5.

    ``images``: (N, C, H, W). Every sample gets its own offsets; the result has the same shape
    and is a new tensor (the input is returned unchanged when ``info`` asks for no augmentation).
    Draws from ``generator`` (on its own device) in a fixed order, so results are deterministic.
    """
    n, c, h, w = images.shape
    out = images
    p = int(info.crop_padding)
    gdev = generator.device
    if p > 0 and n > 0:
        padded = F.pad(images, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=gdev)
        off = off.to(images.device)
        rows = off[0, :, None] + torch.arange(h, device=images.device)  # (N, H)
        cols = off[1, :, None] + torch.arange(w, device=images.device)  # (N, W)
        # One gather over the flattened padded plane: index (row * padded_width + col).
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w)
        out = torch.gather(padded.flatten(2), 2, flat.expand(n, c, h * w)).view(n, c, h, w)
    if info.hflip and n > 0:
        flip = torch.rand(n, generator=generator, device=gdev) < 0.5
        flip = flip.to(images.device)[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
    return out


# --------------------------------------------------------------------------------------------
# Batch loader
# --------------------------------------------------------------------------------------------


class BatchLoader:
    """Seeded mini-batches ``(images, labels)`` over an :class:`ImageTensors`.

    * ``shuffle``: a permutation from ``torch.Generator().manual_seed(seed + epoch)``, identical on
      every rank (like ``DistributedSampler``).
    * ``rank``/``world_size``: rank r takes items ``r, r + W, r + 2W, ...`` of the permutation,
      padded by wrapping around so every rank has ``ceil(N / W)`` items and the same number of
      batches.
    * ``augment_info``: apply :func:`augment_batch` with a generator seeded from
      ``(seed, epoch, rank)``; None = no augmentation.
    * ``drop_last``: drop each rank's last incomplete batch.

    Iterating twice in the same epoch yields identical batches; call :meth:`set_epoch` to move on.
    Batches are new tensors (index copies) on the device of ``data``.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        shuffle: bool = False,
        augment_info: DatasetInfo | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise FmktError(f"batch_size is {batch_size}: expected a positive integer.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise FmktError(
                f"rank {rank} with world_size {world_size} is invalid: expected "
                "world_size >= 1 and 0 <= rank < world_size."
            )
        if len(data) == 0:
            raise FmktError("The dataset given to BatchLoader is empty: expected at least one item.")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment_info = augment_info
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        #: items this rank sees per epoch (after padding)
        self.num_samples = math.ceil(len(data) / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's item indices for the current epoch, in batch order (int64)."""
        n = len(self.data)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            reps = math.ceil(total / n)
            order = order.repeat(reps)[:total]
        return order[self.rank:total:self.world_size]

    def _aug_generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices().to(self.data.images.device)
        gen = self._aug_generator() if self.augment_info is not None else None
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.data.images.index_select(0, sel)
            labels = self.data.labels.index_select(0, sel.to(self.data.labels.device))
            if gen is not None:
                images = augment_batch(images, self.augment_info, gen)
            yield images, labels
