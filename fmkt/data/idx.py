"""IDX files (the MNIST format): :func:`read_idx` for one file, :func:`read_idx_folder` for the four files of
MNIST and Fashion-MNIST (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``, each raw or ``.gz``)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from fmkt.data.sources import DatasetSource, check_label_range
from fmkt.errors import FmktError

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
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


def _find_idx_files(source: DatasetSource, folder: Path) -> dict[str, Path]:
    """The four files in ``folder`` (each raw or ``.gz``), keyed like :data:`_IDX_FILES`."""
    expected = ", ".join(f"{f}(.gz)" for f in _IDX_FILES.values())
    if not folder.is_dir():
        raise source.not_found(folder, expected)
    paths: dict[str, Path] = {}
    for key, base in _IDX_FILES.items():
        for cand in (folder / base, folder / f"{base}.gz"):
            if cand.is_file():
                paths[key] = cand
                break
        else:
            raise source.not_found(folder, expected)
    return paths


def _read_idx_split(source: DatasetSource, img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N, 1, H, W) and labels (N,), both uint8, checked against ``source.info``."""
    info = source.info
    images = read_idx(img_path, expected_ndim=3)
    labels = read_idx(lab_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise FmktError(
            f"{img_path} / {lab_path} do not hold unsigned bytes: expected uint8 IDX files "
            f"of {source.title}; re-download them or pass --data-dir."
        )
    if tuple(images.shape[1:]) != info.image_size:
        raise FmktError(
            f"{img_path} holds {images.shape[1]}x{images.shape[2]} images: expected "
            f"{info.image_size[0]}x{info.image_size[1]} {source.title} images; "
            "check --data-dir."
        )
    if labels.shape[0] != images.shape[0]:
        raise FmktError(
            f"{lab_path} has {labels.shape[0]} labels but {img_path} has {images.shape[0]} "
            "images: expected one label per image; re-download them or pass --data-dir."
        )
    check_label_range(labels, info.num_classes, lab_path)
    return images[:, None], labels


def read_idx_folder(source: DatasetSource, folder: Path) -> tuple[np.ndarray, ...]:
    """The train and test splits of an MNIST-style folder, as uint8 arrays."""
    paths = _find_idx_files(source, folder)
    out: list[np.ndarray] = []
    for split in ("train", "test"):
        out += _read_idx_split(source, paths[f"{split}_images"], paths[f"{split}_labels"])
    return tuple(out)
