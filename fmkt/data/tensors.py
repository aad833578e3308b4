"""The in-memory kind of dataset: :class:`DatasetInfo` (static facts, every kind's), :class:`ImageTensors` (a whole
split as tensors, a :class:`fmkt.data.split.Split` kind: the registered readers' arrays, cached, resized to
``data.image_size``), and the checks and normalisation that read them."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmkt.data.loader import BatchLoader
from fmkt.data.split import Split
from fmkt.errors import FmktError


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


@dataclass
class ImageTensors(Split):
    """A whole split in memory (a :class:`Split` kind, ``resident``: ``to(device)`` moves it whole).

    ``images``: float32 (N, C, H, W) in [0, 1], raw (not normalised).
    ``labels``: int64 (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor
    resident = True

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

    def to(self, device) -> "ImageTensors":
        """The split on ``device`` (a GPU-resident dataset: batches are then indexed and augmented there)."""
        return ImageTensors(self.images.to(device), self.labels.to(device))

    def take(self, indices: torch.Tensor) -> "ImageTensors":
        """The images at ``indices`` (in that order), as new tensors."""
        return ImageTensors(self.images[indices], self.labels[indices])

    def shard(self, rank: int, world: int) -> "ImageTensors":
        """Images ``rank, rank + world, ...`` (views, no padding)."""
        return ImageTensors(self.images[rank::world], self.labels[rank::world])

    def loader(self, batch_size: int, *, shuffle: bool = False, augment_info=None, seed: int = 0,
               drop_last: bool = False, rank: int = 0, world_size: int = 1, device=None) -> BatchLoader:
        """A :class:`BatchLoader` (its batches on this split's device, whatever ``device`` says)."""
        return BatchLoader(self, batch_size, shuffle=shuffle, augment_info=augment_info, seed=seed,
                           drop_last=drop_last, rank=rank, world_size=world_size)

    def check(self, info: DatasetInfo) -> None:
        """The images checked (:func:`check_images`) against ``info``'s channels."""
        check_images(self.images, info.in_channels)

    def sample_inputs(self, n: int) -> torch.Tensor:
        return self.images[:n].cpu().contiguous()

    @classmethod
    def open(cls, source, data_dir, *, image_size: int | None = None, workers: int | None = None,
             decode: str = "cpu", per_image=None) -> tuple["ImageTensors", "ImageTensors", DatasetInfo]:
        """A registered dataset's reader's arrays (parsed once per (source, folder) and cached) as fresh tensors,
        resized to ``image_size`` when given (:func:`resize_split`); ``data_dir`` None: ``source.default_dir``."""
        folder: str | None = None
        if source.default_dir is not None:
            folder = str(Path(data_dir if data_dir is not None else source.default_dir).expanduser().resolve())
        (tr_x, tr_y, te_x, te_y), scale = _load_cached(source, folder)
        return (resize_split(_to_tensors(tr_x, tr_y, scale), image_size),
                resize_split(_to_tensors(te_x, te_y, scale), image_size), sized_info(source.info, image_size))

    @classmethod
    def describe(cls, source, data_dir, *, image_size: int | None = None, workers: int | None = None) -> DatasetInfo:
        """The registered facts at ``image_size``, no file read."""
        return sized_info(source.info, image_size)


@functools.lru_cache(maxsize=4)
def _load_cached(source, folder: str | None) -> tuple[tuple[np.ndarray, ...], float]:
    """The registered reader's arrays (read-only) and the divisor that maps the images to [0, 1]."""
    arrays = source.read(source, None if folder is None else Path(folder))
    frozen = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        frozen.append(a)
    return tuple(frozen), source.scale


def clear_tensor_cache() -> None:
    _load_cached.cache_clear()


def _to_tensors(images: np.ndarray, labels: np.ndarray, scale: float) -> ImageTensors:
    # torch.from_numpy would share (read-only) memory; the float conversion makes a fresh
    # tensor, so callers can never corrupt the cache.
    img = torch.from_numpy(images.astype(np.float32)).div_(scale)
    lab = torch.from_numpy(labels.astype(np.int64, copy=True))
    return ImageTensors(img, lab)


def sized_info(info: DatasetInfo, size: int | None) -> DatasetInfo:
    """``info`` of in-memory data resized to ``size`` x ``size`` (its crop padding scaled with it)."""
    if size is None or tuple(info.image_size) == (size, size):
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
