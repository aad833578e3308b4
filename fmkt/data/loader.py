"""Seeded mini-batches: :class:`EpochSampler` (every loader's epoch, shuffling, sharding across ranks and skip),
:class:`BatchLoader` (in-memory data) and :func:`augment_batch` (random crop and flip on tensors), all drawing from
explicit ``torch.Generator`` objects, so the same seed and epoch always give the same batches."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmkt.data.deit_aug import repeated_indices, repeated_length
from fmkt.errors import FmktError

if TYPE_CHECKING:  # the kinds import their loaders: these names are for the annotations only
    from fmkt.data.tensors import DatasetInfo, ImageTensors


def draw_augmentation(n: int, info: DatasetInfo, generator: torch.Generator) -> tuple:
    """The random numbers :func:`augment_batch` uses for ``n`` images, drawn from ``generator`` in a fixed order
    (crop offsets (2, n), then flip coins (n,)); None where ``info`` asks for no crop or no flip."""
    p = int(info.crop_padding)
    off = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=generator.device) if p > 0 and n else None
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5 if info.hflip and n else None
    return off, flip


def apply_augmentation(images: torch.Tensor, info: DatasetInfo, off, flip) -> torch.Tensor:
    """Random crop (zero padding ``info.crop_padding``, offsets ``off``) then flip where ``flip`` is True."""
    n, c, h, w = images.shape
    out = images
    p = int(info.crop_padding)
    if off is not None:
        padded = F.pad(images, (p, p, p, p))
        off = off.to(images.device, non_blocking=True)
        rows = off[0, :, None] + torch.arange(h, device=images.device)  # (N, H)
        cols = off[1, :, None] + torch.arange(w, device=images.device)  # (N, W)
        # One gather over the flattened padded plane: index (row * padded_width + col).
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(n, 1, h * w)
        out = torch.gather(padded.flatten(2), 2, flat.expand(n, c, h * w)).view(n, c, h, w)
    if flip is not None:
        out = torch.where(flip.to(images.device, non_blocking=True)[:, None, None, None], out.flip(-1), out)
    return out


def augment_batch(
    images: torch.Tensor, info: DatasetInfo, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (zero padding ``info.crop_padding``) then, if ``info.hflip``, flip with p=0.5.

    ``images``: (N, C, H, W). Every sample gets its own offsets; the result has the same shape
    and is a new tensor (the input is returned unchanged when ``info`` asks for no augmentation).
    Draws from ``generator`` (on its own device) in a fixed order, so results are deterministic.
    """
    return apply_augmentation(images, info, *draw_augmentation(images.shape[0], info, generator))


def shard_indices(n: int, num_samples: int, shuffle: bool, seed: int, epoch: int, rank: int,
                  world_size: int) -> torch.Tensor:
    """Rank ``rank``'s ``num_samples`` item indices of an epoch, in batch order: one permutation of ``n`` items
    from ``torch.Generator().manual_seed(seed + epoch)`` (or 0..n-1), identical on every rank, padded by wrapping
    around to ``num_samples * world_size`` (as ``DistributedSampler`` does), then every ``world_size``-th item."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    total = num_samples * world_size
    if total > n:
        reps = math.ceil(total / n)
        order = order.repeat(reps)[:total]
    return order[rank:total:world_size]


class EpochSampler:
    """The sampler half every loader shares: which of ``n`` items rank ``rank`` of ``world_size`` sees in each epoch,
    in batch order, and in how many batches (a loader subclasses it and turns :meth:`batch_numbers` into batches).

    * ``shuffle``: one permutation per epoch from ``torch.Generator().manual_seed(seed + epoch)``, identical on every
      rank (like ``DistributedSampler``); else 0..n-1.
    * rank r takes items ``r, r + W, r + 2W, ...`` of it, padded by wrapping around so every rank has
      ``num_samples = ceil(n / W)`` items and the same number of batches (:func:`shard_indices`).
    * ``repeats`` (timm's repeated augmentation, a shuffled image-folder loader): each item ``repeats`` times in a
      row, :func:`fmkt.data.deit_aug.repeated_indices` (:meth:`copies` says which copy each is), ``num_samples``
      :func:`fmkt.data.deit_aug.repeated_length`.
    * ``drop_last``: drop each rank's last incomplete batch.
    * :meth:`set_epoch` picks the epoch; :meth:`skip` starts the next iteration at batch k (a resumed epoch: the
      same batches as a whole iteration from there on, the earlier ones never built); once only.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, repeats: int = 0) -> None:
        if batch_size < 1:
            raise FmktError(f"batch_size is {batch_size}: expected a positive integer.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise FmktError(f"rank {rank} with world_size {world_size} is invalid: expected world_size >= 1 and "
                            "0 <= rank < world_size.")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world_size = bool(drop_last), int(rank), int(world_size)
        self.repeats = int(repeats)
        self.epoch = 0
        self._start = 0  # the batch the next iteration starts at (skip)
        #: items this rank sees per epoch (after padding)
        self.num_samples = (repeated_length(self.n, self.world_size, self.repeats) if self.repeats
                            else math.ceil(self.n / self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration at batch ``batches``, building (or decoding) nothing before it (once; then 0)."""
        self._start = int(batches)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's item indices for the current epoch, in batch order (int64)."""
        if self.repeats:
            return self.copies()[0]
        return shard_indices(self.n, self.num_samples, self.shuffle, self.seed, self.epoch, self.rank,
                             self.world_size)

    def copies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeated augmentation: this rank's (item indices, copy numbers) of the current epoch."""
        return repeated_indices(self.n, self.repeats, self.seed, self.epoch, self.rank, self.world_size)

    def batch_numbers(self) -> range:
        """The batches of the iteration starting now: from the batch :meth:`skip` named (then 0 again) to the last;
        batch b holds positions ``b * batch_size`` up to ``(b + 1) * batch_size`` of :meth:`indices`."""
        start, self._start = self._start, 0
        return range(start, len(self))


class BatchLoader(EpochSampler):
    """Seeded mini-batches ``(images, labels)`` over an :class:`ImageTensors`: the :class:`EpochSampler`'s items,
    indexed on the device of ``data``.

    * ``augment_info``: apply :func:`augment_batch` with a generator seeded from
      ``(seed, epoch, rank)``; None = no augmentation.

    Iterating twice in the same epoch yields identical batches; call :meth:`set_epoch` to move on.
    Batches are new tensors (index copies) on the device of ``data``.
    """

    def __init__(self, data: ImageTensors, batch_size: int, shuffle: bool = False,
                 augment_info: DatasetInfo | None = None, seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(len(data), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size)
        if len(data) == 0:
            raise FmktError("The dataset given to BatchLoader is empty: expected at least one item.")
        self.data = data
        self.augment_info = augment_info

    def _aug_generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices().to(self.data.images.device)
        draws, batches = self._epoch_draws(), self.batch_numbers()
        for b in batches:
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.data.images.index_select(0, sel)
            labels = self.data.labels.index_select(0, sel.to(self.data.labels.device))
            if draws is not None:
                images = apply_augmentation(images, self.augment_info, *draws[b])
            yield images, labels

    def _epoch_draws(self) -> list | None:
        """Every batch's augmentation randoms for this epoch, drawn up front in batch order (the same numbers the
        per-batch draws give) and, for data on a GPU, copied there at once: no host work per batch."""
        if self.augment_info is None:
            return None
        gen, device = self._aug_generator(), self.data.images.device
        sizes = [min(self.batch_size, self.num_samples - b * self.batch_size) for b in range(len(self))]
        draws = [draw_augmentation(n, self.augment_info, gen) for n in sizes]
        if device.type == "cpu":
            return draws
        return [tuple(None if t is None else t.to(device, non_blocking=False) for t in d) for d in draws]
