"""The epoch loop of both trainers: fmkt.engine's ``train_epoch`` (which adds the progress bar, train.log's step log,
mid-epoch checkpoints and the resumed epoch's sums around it) and the Python API's ``FMKT.fit`` run these steps.

Each batch goes to the device and through the run's step (fmkt.capture.make_step's: the eager step or the captured
one, under bf16 autocast when asked), its losses into an :class:`fmkt.meter.EpochMeter`, which reads them from the
device at ~2 Hz, before a checkpoint and at the end; a NaN/Inf loss, raised by the eager step or read back from a
captured one, becomes the one sentence of :func:`fmkt.step.nonfinite_loss`. Nothing here imports rich, the
checkpoint or the logs: the caller's hooks do that part.
"""
from __future__ import annotations

from fmkt.meter import EpochMeter, NonFiniteStep
from fmkt.step import NonFiniteLoss, nonfinite_loss


def run_epoch(step, batches, epoch: int, iters: int, device, lr_at, *, start: int = 0,
              meter: EpochMeter | None = None, save_every: int = 0, on_read=None, on_save=None,
              last_good=lambda: None) -> EpochMeter:
    """Steps ``start``, ``start + 1``, ... of epoch ``epoch`` (``iters`` steps in all) over ``batches``, which yields
    ``(images, labels, ...)`` from step ``start`` on. ``step(images, labels, progress)`` trains one batch
    (``progress`` = epoch + step / iters); ``lr_at(global step)`` is the LR it trains with (from the schedule: no
    device sync). Hooks: ``on_read(records)`` after each read (fmkt.meter.StepRecord, in step order);
    ``on_save(steps done, meter)`` every ``save_every`` steps but the last; ``last_good()`` the last checkpoint, for
    the NaN sentence. Returns the meter, every step read."""
    meter = EpochMeter() if meter is None else meter

    def read() -> None:
        try:
            records = meter.read()
        except NonFiniteStep as exc:
            raise stopped(epoch, exc.step, exc.value, last_good()) from None
        if records and on_read is not None:
            on_read(records)

    for i, (images, labels, *_) in enumerate(batches, start=start):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        try:
            losses = step(images, labels, epoch + i / iters)
        except NonFiniteLoss as exc:
            raise stopped(epoch, i, exc.value, last_good()) from None
        meter.add(i, losses, len(labels), lr_at(epoch * iters + i))
        save = bool(save_every) and (i + 1) % save_every == 0 and i + 1 < iters
        if save or meter.due() or i + 1 == iters:
            read()
        if save:
            on_save(i + 1, meter)
    read()
    return meter


def stopped(epoch: int, step: int, value: float, last_good=None):
    """The error for a NaN/Inf loss at (epoch, step): before any weight update (the first step of a fresh run) the
    learning rate cannot be the cause."""
    return nonfinite_loss(value, epoch, step, updated=bool(epoch or step or last_good), last_good=last_good)
