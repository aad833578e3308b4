"""The dataset interface: :class:`Split`, one split (train or test) of a dataset, whatever its kind.

The engine, evaluation, the commands, fmkt.json and export parity ask a split only what this class declares (no
``isinstance``): what it holds (``len``, ``labels``), how it is chosen and sharded (``take`` / ``subset`` /
``split`` / ``shard``), where it lives (``resident``: in memory as tensors that ``to(device)`` moves whole, or on the
host, read by loader workers), how it is batched (``loader``), checked and recorded (``check``, ``record``,
``evaluation_record``), what export parity feeds the exported graph (``sample_inputs``) and how the registry opens
it (``open`` / ``describe``, named by a :class:`fmkt.data.sources.DatasetSource` entry's ``kind``), as timm's
``readers/reader.py`` is the one face of its readers.

The kinds: :class:`fmkt.data.tensors.ImageTensors` (in memory, may move to the GPU whole) and
:class:`fmkt.data.folder.ImageFolderSet` (a file list decoded by DataLoader workers). A new kind is one subclass
implementing the abstract methods (``take``, ``loader``, ``sample_inputs``, ``open``) and overriding what differs,
plus its registry entry. Every loader keeps its epoch, skip and sharding in one sampler,
:class:`fmkt.data.loader.EpochSampler`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fmkt.errors import FmktError


class Split(ABC):
    """One split of a dataset. ``labels``: one int64 class key per item (what the seeded subsets stratify by).

    ``resident`` (where it lives): True for a split held in memory as tensors, which ``to(device)`` moves whole (its
    batches are then indexed there); False for one that stays on the host, read by its loader's workers.
    ``evaluated``: the images the last evaluation of this split scored (set by :func:`fmkt.evaluation.evaluate`).
    """

    resident = False
    evaluated: int | None = None
    labels: torch.Tensor

    # ------------------------------------------------------------------ what it holds, how it is chosen and sharded
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def take(self, indices: torch.Tensor) -> "Split":
        """The items at ``indices`` (in that order), as a new split of the same kind and settings."""

    def subset(self, n: int, seed: int = 0) -> "Split":
        """A seeded, class-stratified subset of ``n`` items (all items, as a new split, if n >= len).

        Stratification: each class keeps about ``n * class_count / len`` items (within one); which items is decided
        by a ``torch.Generator`` seeded with ``seed``; the chosen items keep their order (:func:`stratified_indices`).
        """
        if n < 0:
            raise FmktError(f"subset size {n} is negative: expected a count >= 0.")
        if n >= len(self):
            return self.take(torch.arange(len(self)))
        return self.take(stratified_indices(self.labels, n, seed))

    def split(self, n: int, seed: int = 0) -> tuple["Split", "Split"]:
        """(the seeded stratified ``subset(n, seed)``, every other item): a held-out split and the rest."""
        if not 0 < n < len(self):
            raise FmktError(f"cannot hold out {n} of {len(self)} images: expected 0 < n < {len(self)}.")
        chosen = stratified_indices(self.labels, n, seed)
        rest = torch.ones(len(self), dtype=torch.bool)
        rest[chosen] = False
        return self.take(chosen), self.take(torch.nonzero(rest).flatten())

    def shard(self, rank: int, world: int) -> "Split":
        """Items ``rank, rank + world, ...`` (a rank's share of an evaluation, no padding)."""
        return self.take(torch.arange(rank, len(self), world))

    # ------------------------------------------------------------------ where it lives, how it is batched
    def to(self, device) -> "Split":
        """The split on ``device`` (a resident split only: the others stay on the host)."""
        raise FmktError(f"a {type(self).__name__} stays on the host (its loader's workers read it); it cannot move "
                        f"to {device}.")

    @abstractmethod
    def loader(self, batch_size: int, *, shuffle: bool = False, augment_info=None, seed: int = 0,
               drop_last: bool = False, rank: int = 0, world_size: int = 1, device=None):
        """Seeded batches ``(images, labels)`` of this split (``len``, ``set_epoch``, ``skip(k)``, iteration; see
        :class:`fmkt.data.loader.EpochSampler`): shuffled per epoch, augmented with ``augment_info``'s (a
        :class:`DatasetInfo`; None: no augmentation), rank ``rank`` of ``world_size``'s share, on ``device``."""

    # ------------------------------------------------------------------ checks and records
    def check(self, info) -> None:
        """Raise :class:`FmktError` (one sentence) if the items do not fit ``info``; nothing to check by default."""

    def record(self, *others: "Split") -> dict:
        """fmkt.json's ``dataset`` keys of this split and the run's ``others`` (its other splits) beyond the name and
        classes; {} by default."""
        return {}

    def evaluation_record(self) -> dict:
        """fmkt.json's metrics keys of this split's last evaluation: ``images_evaluated`` (all ranks together)."""
        return {"images_evaluated": len(self) if self.evaluated is None else self.evaluated}

    @abstractmethod
    def sample_inputs(self, n: int) -> torch.Tensor:
        """Up to ``n`` of the first items as evaluation sees them, float32 (n, C, H, W) raw images in [0, 1] on the
        CPU (the inputs of export parity); an item that cannot be read is left out."""

    # ------------------------------------------------------------------ how the registry opens it
    @classmethod
    @abstractmethod
    def open(cls, source, data_dir, *, image_size: int | None = None, workers: int | None = None,
             decode: str = "cpu", per_image=None) -> tuple["Split", "Split", object]:
        """``(train, test, DatasetInfo)`` of the registered ``source`` (its :class:`DatasetSource`) read from
        ``data_dir`` (None: its default), at ``image_size``; ``workers``, ``decode`` and ``per_image`` are the
        data section's options for kinds that read files as they train."""

    @classmethod
    def describe(cls, source, data_dir, *, image_size: int | None = None, workers: int | None = None):
        """The :class:`DatasetInfo` ``open`` would give, reading as little as the kind allows."""
        return cls.open(source, data_dir, image_size=image_size, workers=workers)[2]


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The sorted indices of a seeded, class-stratified choice of ``n`` of ``labels``' items (n < len(labels)):
    :meth:`Split.subset`'s choice, the same for every kind."""
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
