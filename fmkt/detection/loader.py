"""Seeded batches of a COCO-format split (:class:`fmkt.detection.coco.CocoSplit`), decoded by
``torch.utils.data.DataLoader`` workers as :class:`fmkt.data.workers.FolderLoader` decodes image folders:

* training (``train=True``) walks the images with a training box (``split.train_indices``): one permutation per
  epoch from ``seed + epoch``, identical on every rank, padded by wrapping around, rank r taking every W-th item
  (:func:`fmkt.data.loader.shard_indices`), the last incomplete batch dropped (static shapes); each image's flip
  coin comes from ``item_rng(seed, epoch, image index)``, so batches do not depend on the number of workers, and
  ``skip(k)`` starts the next iteration at batch k without decoding the ones before (resume);
* evaluation (``train=False``) walks every image in order (rank r: images r, r + W, ..., no padding, so no image
  is counted twice), resize only, and its targets also carry ``image_id`` and ``orig_size`` (height, width) to map
  the detections back (:func:`fmkt.detection.coco_eval.to_coco_results`).

A batch is ``(images float32 (B, 3, S, S) in [0, 1], [{"boxes": (n, 4) float32 xyxy, "labels": (n,) int64}])``
on ``device``, as torchvision's detectors take it; it travels from the workers as uint8. A file that cannot be
decoded, or whose size is not the one its annotations state, is one :class:`FmktError` naming it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fmkt.data.loader import shard_indices
from fmkt.data.transforms import decode_rgb, describe_error, item_rng
from fmkt.data.workers import default_workers, keyed_loader, release_loader
from fmkt.detection.transforms import eval_transform, train_transform
from fmkt.errors import FmktError


class DetectionItems:
    """What a worker holds (arrays only, cheap to send): the split's paths, sizes, ids and flat boxes;
    ``__getitems__((epoch, indices))`` decodes one batch into ``(images uint8 (B, 3, S, S), targets, fatal
    message or None)``."""

    def __init__(self, split, size: int, train: bool, seed: int) -> None:
        self.paths = [split.path(i) for i in range(len(split))]
        self.sizes, self.image_ids = split.sizes, split.image_ids
        self.boxes, self.labels, self.offsets = split.boxes, split.labels, split.offsets
        self.size, self.train, self.seed = int(size), bool(train), int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, key):
        epoch, indices = key
        images, targets = [], []
        for index in indices:
            try:
                image, target = self.item(epoch, int(index))
            except FmktError as exc:
                return None, None, str(exc)
            images.append(image)
            targets.append(target)
        return torch.stack(images), targets, None

    def item(self, epoch: int, index: int) -> tuple[torch.Tensor, dict]:
        """Image ``index`` decoded and transformed, with its target."""
        path, (height, width) = self.paths[index], (int(v) for v in self.sizes[index])
        try:
            chw = decode_rgb(path)
        except Exception as exc:  # whatever the decoder raises for a file it cannot read
            raise FmktError(f"cannot decode {path} ({describe_error(exc)}): expected an image file; replace it or "
                            "remove it from the annotations.") from None
        if tuple(chw.shape[-2:]) != (height, width):
            raise FmktError(f"{path} is {chw.shape[-1]}x{chw.shape[-2]} pixels but its annotations say "
                            f"{width}x{height}: expected the image the annotations were made on.")
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        boxes = torch.from_numpy(self.boxes[lo:hi].copy())
        if self.train:
            image, boxes = train_transform(chw, boxes, self.size, item_rng(self.seed, epoch, index))
            return image, {"boxes": boxes, "labels": torch.from_numpy(self.labels[lo:hi].copy())}
        image, boxes = eval_transform(chw, boxes, self.size)
        return image, {"boxes": boxes, "labels": torch.from_numpy(self.labels[lo:hi].copy()),
                       "image_id": torch.tensor(int(self.image_ids[index])),
                       "orig_size": torch.tensor([height, width])}


class DetectionLoader:
    """Seeded batches of ``split`` at ``size`` x ``size`` on ``device`` (see the module docstring), decoded by
    ``workers`` DataLoader processes (0: in this process; None: :func:`fmkt.data.workers.default_workers`)."""

    def __init__(self, split, size: int, batch_size: int, train: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device=None, workers: int | None = None) -> None:
        if batch_size < 1 or size < 1:
            raise FmktError(f"batch_size is {batch_size} and size {size}: expected positive integers.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise FmktError(f"rank {rank} with world_size {world_size} is invalid: expected world_size >= 1 and "
                            "0 <= rank < world_size.")
        self.items = np.asarray(split.train_indices if train else np.arange(len(split)), dtype=np.int64)
        if len(self.items) == 0:
            what = "has no image with a box to train on" if train else "has no image"
            raise FmktError(f"{split.annotation_file} {what}: expected at least one.")
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.workers = default_workers() if workers is None else int(workers)
        self.fetch = DetectionItems(split, size, train, seed)
        self.epoch, self._start = 0, 0
        self.num_samples = math.ceil(len(self.items) / self.world_size)
        if train and self.num_samples < self.batch_size:
            raise FmktError(f"{split.annotation_file} gives rank {rank} {self.num_samples} training image(s), "
                            f"fewer than one batch of {batch_size}: lower the batch size.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Start the next iteration at batch ``batches``, decoding nothing before it (once; then 0 again)."""
        self._start = int(batches)

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return math.ceil(len(self.indices()) / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's image indices (rows of the split) for the current epoch, in batch order."""
        if not self.train:
            return torch.from_numpy(self.items[self.rank::self.world_size].copy())
        order = shard_indices(len(self.items), self.num_samples, True, self.seed, self.epoch, self.rank,
                              self.world_size)
        return torch.from_numpy(self.items[order.numpy()])

    def __iter__(self):
        start, self._start = self._start, 0
        bs, epoch, idx = self.batch_size, self.epoch, self.indices().tolist()
        loader = self._dataloader()
        loader.batch_sampler.keys = [(epoch, idx[b * bs:(b + 1) * bs]) for b in range(start, len(self))]
        for images, targets, fatal in loader:
            if fatal:
                raise FmktError(fatal)
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            yield images, [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]

    def _dataloader(self) -> torch.utils.data.DataLoader:
        """A training loader's DataLoader is made once (persistent workers); an evaluation's per iteration. Its
        base seed is not drawn from torch's global generator (resume)."""
        return keyed_loader(self, self.fetch, self.workers, self.workers > 0 and self.train, self.device,
                            generator=torch.Generator())

    def close(self) -> None:
        """End the persistent workers now (they end anyway when this loader is freed)."""
        release_loader(self)
