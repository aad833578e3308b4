"""The image folder's loader, :class:`FolderLoader` (what :meth:`fmkt.data.folder.ImageFolderSet.loader` returns):
an :class:`~fmkt.data.loader.EpochSampler`, as the in-memory :class:`~fmkt.data.loader.BatchLoader` is, so both have
``set_epoch``, ``len``, iteration and ``skip(k)`` (start the next iteration at batch k) and the same items per batch.

:class:`FolderLoader` decodes files in ``torch.utils.data.DataLoader`` worker processes (``data.workers``; pinned
memory on CUDA, persistent workers for training, a few batches prefetched per worker):

* the batches are the EpochSampler's, as BatchLoader's: one permutation per epoch from ``seed + epoch``, identical on
  every rank, padded by wrapping around, rank r taking every W-th item, so every rank has the same number of batches
  (with ``data.repeated_aug``, timm's repeated-augmentation epoch);
* each item's crop and flip come from a generator seeded with (seed, epoch, item index)
  (:func:`fmkt.data.transforms.item_rng`), so batches do not depend on the number of workers or on which one
  decoded what, and a resumed epoch (``skip``) sees the crops an uninterrupted one sees, without decoding the
  batches already done;
* a file that cannot be decoded is skipped and counted (:class:`fmkt.data.folder.SkippedFiles`): in a training
  batch (``drop_last``: static shapes, as the captured step needs) a deterministic other item takes its place; in
  an evaluation batch it is left out;
* a batch travels as uint8 (a quarter of float32's bytes) and becomes float32 in [0, 1] on its device;
* ``data.decode=gpu`` (a CUDA device only, else one sentence, :func:`refuse_gpu_decode`): the workers read the
  files and draw each JPEG's crop and flip from its header's size (the same draws, from the same generator, as
  decoding it would give) but leave it encoded; the main process decodes the batch's JPEGs together with
  ``torchvision.io.decode_jpeg(list, device="cuda")`` (nvjpeg) and crops them there
  (:meth:`FolderLoader.decode_on_device`). Other formats are decoded by the workers, a JPEG nvjpeg refuses (CMYK,
  corrupt data) by the CPU, and a file nobody decodes is skipped and counted as above. The pixels are nvjpeg's and
  CUDA's float resize's, so they may differ from the CPU path's by a few levels; the draws, the batches' items,
  seeding, resume and sharding are the CPU path's.
"""
from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

import torch

from fmkt.data.deit_aug import REPEAT_STREAM, build_image_augment, image_generator
from fmkt.data.loader import EpochSampler
from fmkt.data.transforms import crop, decode_bytes, decode_jpegs, decode_rgb, describe_error, draw_train, \
    item_rng, jpeg_size, read_bytes
from fmkt.errors import FmktError

if TYPE_CHECKING:  # the split imports its loader: the name is for the annotations only
    from fmkt.data.folder import ImageFolderSet

REPLACE_TRIES = 32  # other files tried, in a seeded order, before a training item is given up as unreadable
PREFETCH = 4  # batches in flight per worker
DECODE = ("cpu", "gpu")  # data.decode
# The persistent DataLoaders of live FolderLoaders, held here (and dropped by a weakref finalizer when their loader
# dies) so a loader caught in a reference cycle never takes its workers' queues into the cyclic garbage collector:
# there the queues' own finalizers run first and the workers' shutdown waits out its timeouts.
_PERSISTENT: dict[int, torch.utils.data.DataLoader] = {}


def default_workers() -> int:
    """min(8, the CPUs this process may use, divided among the processes torchrun starts on this node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cpus // local))


def refuse_gpu_decode(device: torch.device) -> None:
    """Raise (one sentence) unless ``data.decode=gpu`` can decode on ``device``: a CUDA device of this machine."""
    if not torch.cuda.is_available():
        raise FmktError("data.decode=gpu decodes JPEGs with nvjpeg on a CUDA GPU and this machine has none "
                        "(torch.cuda.is_available() is False); use data.decode=cpu.")
    if device.type != "cuda":
        raise FmktError(f"data.decode=gpu decodes JPEGs on the run's CUDA device but this run is on {device}; "
                        "set train.device=cuda or data.decode=cpu.")


def _as_is(batch):
    return batch


def pack(images: list, size: int) -> tuple:
    """A data.decode=gpu batch as a worker sends it: ``(pixels uint8 (n, 3, S, S) of the files decoded here, one
    uint8 blob of the JPEGs' bytes, one slot per item)``; a slot is the item's row in ``pixels`` (int), or
    ``(start, end, file, item, candidate, draws)`` of an encoded JPEG (one blob: one shared-memory segment)."""
    pixels, blobs, slots, at = [], [], [], 0
    for image in images:
        if isinstance(image, torch.Tensor):
            slots.append(len(pixels))
            pixels.append(image)
            continue
        data, *rest = image
        slots.append((at, at + len(data), *rest))
        blobs.append(data)
        at += len(data)
    stacked = torch.stack(pixels) if pixels else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return stacked, torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8), slots


class FolderBatches:
    """What a worker holds: the split's file list and the transform; ``__getitems__((epoch, indices))`` decodes one
    batch into ``(images uint8 (B, 3, S, S), labels (B,), [(bad path, why)], fatal message or None)``. With
    ``encoded`` (data.decode=gpu) a JPEG is not decoded: its transform is drawn from its header's size and the batch
    is :func:`pack`'s, for :meth:`FolderLoader.decode_on_device`. ``per_image`` (training): DeiT's augmentation
    (:mod:`fmkt.data.deit_aug`) after the crop, built once per worker; a key ``(epoch, indices, repeats)`` names
    each item's copy under repeated augmentation."""

    def __init__(self, data: ImageFolderSet, augment: bool, seed: int, replace: bool, encoded: bool = False,
                 per_image=None, info=None) -> None:
        self.data, self.augment, self.seed, self.replace = data, bool(augment), int(seed), bool(replace)
        self.encoded = bool(encoded)
        self.per_image, self.info, self._augmenter = per_image if augment else None, info, None

    def augmenter(self):
        """The per-image augmentation (None: off), built on first use in the process that decodes."""
        if self.per_image is not None and self._augmenter is None:
            self._augmenter = build_image_augment(self.per_image, self.data.size, self.info.mean, self.info.std)
        return self._augmenter

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, key):
        epoch, indices, repeats = key if len(key) == 3 else (*key, None)
        size, images, labels, bad = self.data.size, [], [], []
        for pos, index in enumerate(indices):
            got = self.item(epoch, int(index), bad, repeat=0 if repeats is None else int(repeats[pos]))
            if got is None and self.replace:
                return None, None, bad, self.hopeless(int(index))
            if got is not None:
                images.append(got[0])
                labels.append(got[1])
        if self.encoded:
            return pack(images, size), torch.tensor(labels, dtype=torch.int64), bad, None
        stacked = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.int64), bad, None

    def hopeless(self, index: int) -> str:
        return (f"{self.data.path(index)} and the {REPLACE_TRIES} files tried in its place could not be decoded; "
                f"check that {self.data.folder} holds readable images.")

    def candidates(self, epoch: int, index: int) -> list[int]:
        """Item ``index``'s file, then (training) the seeded replacements tried in its place, in order."""
        if not self.replace:
            return [index]
        rng = item_rng(self.seed, epoch, index, stream=1)
        return [index] + [int(j) for j in rng.integers(0, len(self.data), REPLACE_TRIES)]

    def item(self, epoch: int, index: int, bad: list, start: int = 0, encoded: bool | None = None, repeat: int = 0):
        """(image, label) of item ``index`` (its copy ``repeat``), or of the first decodable replacement (training)
        from candidate ``start`` on; None if none. ``encoded`` (default: this loader's): a JPEG stays encoded."""
        encoded = self.encoded if encoded is None else encoded
        for pos, j in enumerate(self.candidates(epoch, index)[start:], start):
            try:
                image = self.load(epoch, j, (index, pos) if encoded else None, repeat)
            except Exception as exc:  # any file the decoders cannot read: skipped and counted, never the end of a run
                bad.append((self.data.path(j), describe_error(exc)))
                continue
            return image, int(self.data.labels[j])
        return None

    def load(self, epoch: int, j: int, slot: tuple | None = None, repeat: int = 0):
        """File ``j`` decoded and transformed, ``(3, S, S)`` uint8 (copy ``repeat``: its own crop stream, then the
        per-image augmentation); with ``slot`` ((item, candidate)) a JPEG whose header reads is returned encoded,
        ``(bytes, j, item, candidate, draws)``, its transform drawn from the header's size (the draws decoding it
        here would make)."""
        data = read_bytes(self.data.path(j))
        rng = item_rng(self.seed, epoch, j, stream=REPEAT_STREAM + repeat if repeat else 0) if self.augment else None
        hw = jpeg_size(data) if slot is not None else None
        if hw is not None:
            return data, j, *slot, None if rng is None else draw_train(*hw, rng)
        chw = decode_rgb(self.data.path(j), data)
        image = crop(chw, None if rng is None else draw_train(chw.shape[-2], chw.shape[-1], rng), self.data.size)
        augment = self.augmenter()
        return image if augment is None else augment(image, image_generator(self.seed, epoch, j, repeat))


class FolderLoader(EpochSampler):
    """Seeded batches ``(images float32 (B, 3, S, S) in [0, 1], labels)`` of an :class:`ImageFolderSet` on
    ``device``, decoded by ``workers`` DataLoader processes (0: in this process); see the module docstring. A
    shuffled, augmented loader applies the split's ``per_image`` DeiT augmentation (``info``: its mean/std) and,
    with ``repeated_aug``, shows timm's repeated-augmentation epoch (:func:`fmkt.data.deit_aug.repeated_indices`)."""

    def __init__(self, data: ImageFolderSet, batch_size: int, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1, device=None,
                 workers: int | None = None, decode: str | None = None, info=None) -> None:
        per_image = data.per_image if augment and shuffle else None
        super().__init__(len(data), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size, repeats=per_image.repeated_aug if per_image is not None else 0)
        if len(data) == 0:
            raise FmktError(f"{data.folder} gives no image to load: expected at least one.")
        self.data = data
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        workers = data.workers if workers is None else workers
        self.workers = default_workers() if workers is None else int(workers)
        self.decode = data.decode if decode is None else decode
        if self.decode not in DECODE:
            raise FmktError(f"data.decode is {self.decode!r}: expected one of {', '.join(DECODE)}.")
        if self.decode == "gpu":
            refuse_gpu_decode(self.device)
        self.fetch = FolderBatches(data, augment, self.seed, replace=self.drop_last, encoded=self.decode == "gpu",
                                   per_image=per_image, info=info)

    def __iter__(self):
        bs, epoch = self.batch_size, self.epoch
        idx, rep = (t.tolist() for t in self.copies()) if self.repeats else (self.indices().tolist(), None)
        loader = self._dataloader()
        loader.batch_sampler.keys = [(epoch, idx[b * bs:(b + 1) * bs]) + (() if rep is None else
                                                                         (rep[b * bs:(b + 1) * bs],))
                                     for b in self.batch_numbers()]
        for images, labels, bad, fatal in loader:
            self.data.skipped.note(bad, replaced=self.fetch.replace)
            if fatal:
                raise FmktError(fatal)
            if self.fetch.encoded:
                images, labels = self.decode_on_device(epoch, images, labels)
            if labels.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            yield images, labels.to(self.device, non_blocking=True)

    def decode_on_device(self, epoch: int, packed: tuple, labels: torch.Tensor) -> tuple:
        """data.decode=gpu: a :func:`pack`'d batch as ``(images uint8 (B, 3, S, S), labels)`` on this loader's
        device: its JPEGs decoded together there (nvjpeg on CUDA) and transformed there with the draws the worker
        made; a JPEG the device cannot decode is decoded on the CPU, and a file nobody can decode is skipped and
        counted as a worker does (another item takes its place in training, left out of an evaluation)."""
        pixels, blob, slots = packed
        pixels = pixels.to(self.device, non_blocking=True)  # the files the workers decoded (not JPEG), in one copy
        jpegs = [slot for slot in slots if not isinstance(slot, int)]
        decoded = iter(decode_jpegs([blob[slot[0]:slot[1]] for slot in jpegs], self.device))
        images, kept, bad = [], [], []
        for slot, label in zip(slots, labels.tolist()):
            got = (pixels[slot], label) if isinstance(slot, int) else self._finish(epoch, next(decoded), blob, slot,
                                                                                  label, bad)
            if got is not None:
                images.append(got[0].to(self.device, non_blocking=True))
                kept.append(got[1])
        self.data.skipped.note(bad, replaced=self.fetch.replace)
        size = self.data.size
        out = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return out, torch.tensor(kept, dtype=torch.int64)

    def _finish(self, epoch: int, chw, blob: torch.Tensor, slot: tuple, label: int, bad: list):
        """(image, label) of one encoded JPEG (``chw``: as the device decoded it, None if it could not), or of what
        replaces it; None when an evaluation leaves it out."""
        start, end, j, item, pos, draws = slot
        if chw is None:  # not decodable there (nvjpeg: CMYK, corrupt data): the CPU decides
            try:
                chw = decode_bytes(blob[start:end])
            except Exception as exc:  # a file no decoder reads: skipped and counted, as in a worker
                bad.append((self.data.path(j), describe_error(exc)))
                if not self.fetch.replace:
                    return None
                got = self.fetch.item(epoch, item, bad, start=pos + 1, encoded=False)
                if got is None:
                    self.data.skipped.note(bad, replaced=True)
                    raise FmktError(self.fetch.hopeless(item)) from None
                return got
        return crop(chw, draws, self.data.size), label

    def _dataloader(self) -> torch.utils.data.DataLoader:
        """A training loader's (shuffled) DataLoader is made once, its workers persistent across epochs; an
        evaluation's is made per iteration (its workers end with it)."""
        return keyed_loader(self, self.fetch, self.workers, self.workers > 0 and self.shuffle, self.device)

    def close(self) -> None:
        """End the persistent workers now (they end anyway when this loader is freed)."""
        release_loader(self)


def keyed_loader(owner, fetch, workers: int, persistent: bool, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """The DataLoader of ``owner`` (a FolderLoader, fmkt.detection's DetectionLoader) over ``fetch``: its batch
    sampler (:class:`_Keys`) is filled by the owner's iteration with (epoch, indices) keys, each batch comes back as
    ``fetch`` made it. ``persistent``: made once and kept while ``owner`` lives (its workers survive epochs)."""
    if persistent and id(owner) in _PERSISTENT:
        return _PERSISTENT[id(owner)]
    loader = torch.utils.data.DataLoader(
        fetch, batch_sampler=_Keys(), num_workers=workers, collate_fn=_as_is, pin_memory=device.type == "cuda",
        persistent_workers=persistent, prefetch_factor=PREFETCH if workers > 0 else None, generator=generator)
    if persistent:
        _PERSISTENT[id(owner)] = loader
        weakref.finalize(owner, _PERSISTENT.pop, id(owner), None)
    return loader


def release_loader(owner) -> None:
    """End ``owner``'s persistent workers now (they end anyway when it is freed)."""
    _PERSISTENT.pop(id(owner), None)


class _Keys:
    """The batch sampler: the (epoch, indices) keys of the iteration under way (set by its FolderLoader, which it
    does not reference: no cycle)."""

    def __init__(self) -> None:
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)
