"""An epoch's running losses, read from the device a few times a second instead of after every step.

Reading a loss on the host (``float(loss)``) waits for the GPU to finish the step, which stalls a queue of graph
replays. The epoch loop hands every step's losses to :class:`EpochMeter`, which stacks them on the device (one small
kernel) and reads them all at once when :meth:`EpochMeter.due` (``REFRESH_S`` after the last read), before a
checkpoint and at the epoch's end. The sums come out as they did with a read per step: each step's loss parts in
Python floats, times its batch size, added in step order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fmkt.step import NonFiniteLoss

REFRESH_S = 0.5  # seconds between reads: the progress bar and the per-step logs update at ~2 Hz


@dataclass
class StepRecord:
    """One step as read back: its index in the epoch, loss parts, batch size and the LR it trained with."""

    step: int
    losses: dict
    images: int
    lr: float

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


class NonFiniteStep(NonFiniteLoss):
    """A step's loss read back as NaN/Inf (the captured step left the weights untouched from it on)."""

    def __init__(self, value: float, step: int):
        super().__init__(value)
        self.step = step


class EpochMeter:
    """The running loss sums (``sums``: part -> sum of loss x images) and ``seen`` images of an epoch."""

    def __init__(self, sums: dict | None = None, seen: int = 0, clock=time.perf_counter):
        self.sums, self.seen, self.clock = dict(sums or {}), int(seen), clock
        self.trained = 0  # images trained by this process in this epoch (a resumed epoch's sums hold more)
        self.pending: list = []
        self.last_read = clock()

    def add(self, step: int, losses: dict, images: int, lr: float) -> None:
        """Keep step ``step``'s loss parts (device tensors) without reading them."""
        self.keys = list(losses)
        self.pending.append((step, torch.stack([v.detach().float() for v in losses.values()]), images, lr))

    def due(self) -> bool:
        return self.clock() - self.last_read >= REFRESH_S

    def read(self) -> list[StepRecord]:
        """The pending steps read back in one host sync, added to the sums in step order. Raises
        :class:`NonFiniteStep` at the first step whose loss is not finite (nothing of it or later is added)."""
        if not self.pending:
            return []
        values = torch.stack([p[1] for p in self.pending]).tolist()
        records = []
        for (step, _, images, lr), parts in zip(self.pending, values):
            if not all(math.isfinite(v) for v in parts):
                self.pending = []
                raise NonFiniteStep(sum(parts), step)
            for k, v in zip(self.keys, parts):
                self.sums[k] = self.sums.get(k, 0.0) + v * images
            self.seen += images
            self.trained += images
            records.append(StepRecord(step, dict(zip(self.keys, parts)), images, lr))
        self.pending, self.last_read = [], self.clock()
        return records


def epoch_record(epoch: int, lr: float, sums: dict, seen: int, seconds: float, trained: int | None = None) -> dict:
    """metrics.jsonl's line for one epoch (the API's fit returns the same keys). ``lr``: the LR of the epoch's last
    step; ``seen``: the images the sums cover; ``trained``: those trained in ``seconds`` (default ``seen``; fewer
    in an epoch resumed from a mid-epoch checkpoint)."""
    trained = seen if trained is None else trained
    return {"epoch": epoch + 1, "lr": float(lr), "train_loss": sum(sums.values()) / max(seen, 1),
            **{k: v / max(seen, 1) for k, v in sums.items()}, "epoch_seconds": round(seconds, 3),
            "images_per_s": round(trained / max(seconds, 1e-9), 1)}
