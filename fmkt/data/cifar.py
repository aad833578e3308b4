"""CIFAR-10 and CIFAR-100 from their python-pickle releases (``cifar-10-batches-py``, ``cifar-100-python``).

The batches are Python pickles: they must come from a trusted source, since unpickling untrusted data can
execute arbitrary code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmkt.data.sources import DatasetSource, check_label_range
from fmkt.errors import FmktError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# The fine label names of CIFAR-100 in label order (the release's `meta` file lists them sorted).
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
    lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
assert len(CIFAR100_CLASSES) == 100


@dataclass(frozen=True)
class CifarRelease:
    """The file layout of one CIFAR python release."""

    folder: str  # the folder the tarball extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes  # the labels' key in each pickled batch


CIFAR10_RELEASE = CifarRelease(
    "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"
)
CIFAR100_RELEASE = CifarRelease("cifar-100-python", ("train",), ("test",), b"fine_labels")


def _resolve_release_folder(source: DatasetSource, release: CifarRelease, data_dir: Path) -> Path:
    """``data_dir`` itself or its release subfolder, whichever holds every batch file."""
    needed = release.train_files + release.test_files
    for cand in (data_dir / release.folder, data_dir):
        if cand.is_dir() and all((cand / f).is_file() for f in needed):
            return cand
    raise source.not_found(data_dir, f"{release.folder}/ with {', '.join(needed)} (or those files directly)")


def _read_cifar_pickle(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, ...]:
    """One pickled batch as images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
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
    check_label_range(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(source: DatasetSource, data_dir: Path, release: CifarRelease) -> tuple[np.ndarray, ...]:
    """The train and test splits of ``release`` under ``data_dir`` (the release folder or its parent)."""
    folder = _resolve_release_folder(source, release, data_dir)
    out = []
    for files in (release.train_files, release.test_files):
        parts = [_read_cifar_pickle(folder / f, release.label_key, source.info.num_classes) for f in files]
        out += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
    return tuple(out)
