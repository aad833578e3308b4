"""``--data imagefolder --data-dir ROOT``: a folder of image files in the ImageNet layout, never held in memory.

``ROOT/train/CLASS/**/*.jpg`` and ``ROOT/val/CLASS/**/*.jpg`` (any of :data:`IMG_EXTENSIONS`, any depth below
the class folder, symbolic links followed): classes are the sorted folder names of ``train``, which ``val`` must
repeat. What stays in memory is the list of (file, class) as two numpy arrays (relative paths as fixed-width bytes,
so forked DataLoader workers share them instead of copying Python strings), never the pixels. A split is an
:class:`ImageFolderSet`; :mod:`fmkt.data.workers` decodes its files in DataLoader workers.

Checked when the folder is opened (each one sentence): no ``--data-dir``, a missing ``ROOT``, ``train`` or
``val``, a split without class folders, class folders that differ between the splits, a training class with no
image file, and a split where none of the files probed opens as an image. A ``val`` class with no image is a
warning (the class is trained, not evaluated). A file that fails to decode later is skipped and counted
(:class:`SkippedFiles`), never fatal.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from fmkt.data.split import Split
from fmkt.data.tensors import DatasetInfo
from fmkt.data.transforms import IMG_EXTENSIONS, decode_rgb, describe_error
from fmkt.data.workers import FolderLoader
from fmkt.errors import FmktError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (the ImageNet layout)"
SPLITS = ("train", "val")
PROBES = 8  # files per split opened up front: one must be an image
FIRST = 5  # skipped files named in the log and in fmkt.json
FOLDER_SIZE = 224  # the crop side when data.image_size is not set
log = logging.getLogger("fmkt.data")


class SkippedFiles:
    """Files that could not be decoded, counted once each; the first :data:`FIRST` are named in the log."""

    def __init__(self) -> None:
        self.count, self.first, self._seen = 0, [], set()

    def note(self, bad, replaced: bool) -> None:
        """Record ``bad`` ([(path, why)]) as a worker reported them (``replaced``: a training batch kept its size)."""
        for path, why in bad:
            if path in self._seen:
                continue
            self._seen.add(path)
            self.count += 1
            if len(self.first) < FIRST:
                self.first.append(path)
                what = "another image takes its place in the batch" if replaced else "left out of the evaluation"
                log.warning(f"note: skipped unreadable file {path} ({why}); {what}.")
            elif self.count == FIRST + 1:
                log.warning("note: more unreadable files are skipped and counted but not named "
                            "(fmkt.json: dataset.skipped_files).")


class ImageFolderSet(Split):
    """One split of an image folder (``part``: train or val), a :class:`Split` kind that stays on the host: ``files``
    (paths relative to ``root/part``, bytes) and ``labels`` (int64 tensor), decoded by its loader's DataLoader workers
    (:class:`fmkt.data.workers.FolderLoader`).
    ``workers``: the DataLoader worker processes that decode it (None: :func:`fmkt.data.workers.default_workers`);
    ``decode``: data.decode, where its JPEGs are decoded (cpu: in the workers; gpu: on the run's CUDA device);
    ``per_image``: DeiT's per-image augmentation (:class:`fmkt.data.deit_aug.PerImage`), which a training loader
    applies (None: off)."""

    def __init__(self, root: str, part: str, files: np.ndarray, labels: torch.Tensor, size: int,
                 workers: int | None = None, decode: str = "cpu", per_image=None) -> None:
        self.root, self.part, self.files, self.labels = root, part, files, labels
        self.size, self.workers, self.decode, self.per_image = int(size), workers, decode, per_image
        self.skipped = SkippedFiles()

    @property
    def folder(self) -> str:
        return os.path.join(self.root, self.part)

    def path(self, index: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.files[index]))

    def take(self, indices: torch.Tensor) -> "ImageFolderSet":
        """The files at ``indices`` (in that order), as a new split sharing this one's folder and settings."""
        idx = indices.numpy()
        return ImageFolderSet(self.root, self.part, self.files[idx], self.labels[indices], self.size, self.workers,
                              self.decode, self.per_image)

    def loader(self, batch_size: int, *, shuffle: bool = False, augment_info=None, seed: int = 0,
               drop_last: bool = False, rank: int = 0, world_size: int = 1, device=None) -> FolderLoader:
        """A :class:`FolderLoader` (augmentation on when ``augment_info`` is given: its mean/std for DeiT's)."""
        return FolderLoader(self, batch_size, shuffle=shuffle, augment=augment_info is not None, seed=seed,
                            drop_last=drop_last, rank=rank, world_size=world_size, device=device, info=augment_info)

    def record(self, *others: "ImageFolderSet") -> dict:
        """The folder, the crop side and the files skipped as unreadable in this split and ``others``."""
        sets = [self, *others]
        first = [p for s in sets for p in s.skipped.first][:FIRST]
        return {"dir": self.root, "image_size": self.size,
                "skipped_files": {"count": sum(s.skipped.count for s in sets), "first": first}}

    def evaluation_record(self) -> dict:
        """Also ``images_unreadable``: the files the evaluation left out (None when not evaluated in this process)."""
        n = self.evaluated
        return {"images_evaluated": n, "images_unreadable": None if n is None else len(self) - n}

    def sample_inputs(self, n: int) -> torch.Tensor:
        """The first ``n`` files with the evaluation transform, decoded here (no worker process)."""
        first = self.take(torch.arange(min(max(n, 0), len(self))))
        batches = [x for x, _ in FolderLoader(first, max(len(first), 1), workers=0)] if len(first) else []
        return torch.cat(batches) if batches else torch.empty((0, 3, self.size, self.size))

    @classmethod
    def open(cls, source, data_dir, *, image_size: int | None = None, workers: int | None = None,
             decode: str = "cpu", per_image=None) -> tuple["ImageFolderSet", "ImageFolderSet", DatasetInfo]:
        """:func:`open_image_folder` at ``image_size`` (None: :data:`FOLDER_SIZE`)."""
        return open_image_folder(data_dir, image_size=image_size or FOLDER_SIZE, workers=workers, decode=decode,
                                 per_image=per_image)


def _walk_class(folder: str) -> list[bytes]:
    """The image files below one class folder, relative to its split folder, in sorted order."""
    split = os.path.dirname(folder)
    out = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS):
                out.append(os.fsencode(os.path.relpath(os.path.join(dirpath, name), split)))
    return out


@functools.lru_cache(maxsize=8)
def scan_split(folder: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, tuple[str, ...]]:
    """(class names, relative file paths as bytes, labels, classes without any file) of one split folder."""
    if not os.path.isdir(folder):
        raise FmktError(f"{folder} does not exist: --data imagefolder expects {LAYOUT}.")
    classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=True)))
    if not classes:
        raise FmktError(f"{folder} has no class folders: --data imagefolder expects {LAYOUT}.")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = _walk_class(os.path.join(folder, name))
        files += found
        labels += [label] * len(found)
        if not found:
            empty.append(name)
    paths = np.array(files, dtype=f"S{max((len(f) for f in files), default=1)}")
    paths.setflags(write=False)
    return classes, paths, np.asarray(labels, dtype=np.int64), tuple(empty)


def _probe(folder: str, paths: np.ndarray) -> None:
    """Raise unless one of up to :data:`PROBES` files spread over the split decodes as an image."""
    picks = np.unique(np.linspace(0, len(paths) - 1, min(PROBES, len(paths))).astype(np.int64))
    why = ""
    for i in picks:
        path = os.path.join(folder, os.fsdecode(paths[i]))
        try:
            decode_rgb(path)
            return
        except Exception as exc:  # any failure to decode means the same here: not an image we can read
            why = why or f"{path}: {describe_error(exc)}"
    raise FmktError(f"no file probed in {folder} reads as an image ({why}); check the files are images.")


def _check_classes(root: str, train: tuple, val: tuple) -> None:
    if train != val:
        only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        parts = [f"only in train: {', '.join(only_t[:5])}" if only_t else "",
                 f"only in val: {', '.join(only_v[:5])}" if only_v else ""]
        raise FmktError(f"the class folders of {root}/train and {root}/val differ "
                        f"({'; '.join(p for p in parts if p)}); both splits need the same classes.")


@functools.lru_cache(maxsize=8)
def _open(root: str) -> tuple:
    """Both splits scanned and checked, once per process: ((classes, paths, labels) per split)."""
    if not os.path.isdir(root):
        raise FmktError(f"image folder {root} does not exist; pass --data-dir ROOT with {LAYOUT}.")
    scans = {split: scan_split(os.path.join(root, split)) for split in SPLITS}
    _check_classes(root, scans["train"][0], scans["val"][0])
    empty = scans["train"][3]
    if empty:
        more = f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""
        raise FmktError(f"{root}/train/{empty[0]} holds no image file ({', '.join(IMG_EXTENSIONS[:3])}, ...){more}; "
                        "every class needs training images: add some or remove the class from train and val.")
    if not len(scans["val"][1]):
        raise FmktError(f"{root}/val holds no image file in any class folder; the classes need validation images.")
    for name in scans["val"][3]:
        log.warning(f"note: {root}/val/{name} holds no image: class {name!r} is trained but not evaluated.")
    for split in SPLITS:
        if len(scans[split][1]):
            _probe(os.path.join(root, split), scans[split][1])
    return tuple(scans[s][:3] for s in SPLITS)


def open_image_folder(data_dir, image_size: int = 224, workers: int | None = None, decode: str = "cpu",
                      per_image=None):
    """``(train, val, DatasetInfo)`` of the image folder ``data_dir`` at ``image_size`` (RGB; ImageNet's mean/std,
    which :func:`fmkt.data.load_dataset` may override), its JPEGs decoded where ``decode`` says, ``per_image`` the
    training loader's DeiT augmentation."""
    if data_dir is None:
        raise FmktError(f"--data imagefolder needs --data-dir ROOT, the folder holding {LAYOUT}.")
    root = str(Path(data_dir).expanduser().resolve())
    (classes, tr_files, tr_labels), (_, va_files, va_labels) = _open(root)
    size = int(image_size)
    info = DatasetInfo("imagefolder", len(classes), 3, (size, size), IMAGENET_MEAN, IMAGENET_STD, 0, True, classes)
    return (ImageFolderSet(root, "train", tr_files, torch.from_numpy(tr_labels.copy()), size, workers, decode,
                           per_image),
            ImageFolderSet(root, "val", va_files, torch.from_numpy(va_labels.copy()), size, workers, decode), info)


def clear_folder_cache() -> None:
    _open.cache_clear()
    scan_split.cache_clear()
