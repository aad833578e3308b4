"""The in-memory form of every dataset: :class:`DatasetInfo` (static facts), :class:`ImageTensors` (a whole
split as tensors), and the checks and normalisation that read them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def to(self, device) -> "ImageTensors":
        """The split on ``device`` (a GPU-resident dataset: batches are then indexed and augmented there)."""
        return ImageTensors(self.images.to(device), self.labels.to(device))

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
        chosen = self._stratified(n, seed)
        return ImageTensors(self.images[chosen], self.labels[chosen])

    def split(self, n: int, seed: int = 0) -> tuple["ImageTensors", "ImageTensors"]:
        """(the seeded stratified ``subset(n, seed)``, every other item): a held-out split and the rest."""
        if not 0 < n < len(self):
            raise FmktError(f"cannot hold out {n} of {len(self)} images: expected 0 < n < {len(self)}.")
        chosen = self._stratified(n, seed)
        rest = torch.ones(len(self), dtype=torch.bool)
        rest[chosen] = False
        return ImageTensors(self.images[chosen], self.labels[chosen]), ImageTensors(self.images[rest],
                                                                                     self.labels[rest])

    def _stratified(self, n: int, seed: int) -> torch.Tensor:
        """The sorted indices of ``subset(n, seed)``."""
        return stratified_indices(self.labels, n, seed)


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The sorted indices of a seeded, class-stratified choice of ``n`` of ``labels``' items (n < len(labels)):
    :meth:`ImageTensors.subset`'s choice, shared with the image-folder datasets (a list of files)."""
    total = int(labels.shape[0])
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=gen)
    labels = labels[perm]
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
    return torch.sort(chosen)[0]


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
