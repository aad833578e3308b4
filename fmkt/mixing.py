"""Mixup / CutMix on each training batch (``data.mixup``, ``data.cutmix``): timm's ``Mixup``, in the training step.

:func:`with_mixing` wraps the run's step (fmkt.capture.make_step's, eager or captured) so that each batch, before
it reaches the step, is mixed by ``timm.data.Mixup`` (``mode="batch"``: one draw per batch; with both alphas on,
CutMix with probability 0.5 (``switch_prob``) else Mixup, on every batch (``prob`` 1): DeiT's ``--mixup 0.8
--cutmix 1.0`` and mmcls's RandomBatchAugment of Mixup(0.8) and CutMix(1.0)) and its labels become soft targets
(B, classes): ``lam * onehot(y) + (1 - lam) * onehot(y reversed)``. timm pairs each image with the batch's reverse;
under DDP each rank mixes its own shard, as DeiT does. Label smoothing is not mixed in here (timm's
``label_smoothing`` is 0): the losses apply ``method.label_smoothing`` to the soft target, which is the same
distribution ((1 - e) * mixed + e / K, timm's smoothed one-hots mixed).

The draws (the Mixup/CutMix coin, the beta-distributed lam, CutMix's box) come from a generator seeded with
``(seed, epoch, step, rank)`` (:meth:`BatchMixer.generator`), never from the global generators (timm draws from
numpy's: fmkt.data.deit_aug.seeded_global_rngs seeds it for the call and restores it), so a batch's mix depends on
where it is in the run alone: a resumed run mixes each batch as an uninterrupted one does, and nothing else's draws
move. The engine keeps the hard labels (its image counts); the distillers get the soft targets.
"""
from __future__ import annotations

import numpy as np
import torch

from fmkt.data.deit_aug import seeded_global_rngs
from fmkt.errors import FmktError

MIX_STREAM = 0x313C_0000  # the SeedSequence word that sets the batch mixer's generators apart
SWITCH_PROB = 0.5  # timm's default and DeiT's --mixup-switch-prob: CutMix or Mixup per batch, evenly
_MASK = (1 << 64) - 1


class BatchMixer:
    """``mixer(images, labels, epoch, step) -> (mixed images, soft targets)`` with timm's Mixup; ``images`` is
    mixed in place (a fresh batch from the loader)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int = 0, rank: int = 0):
        from timm.data import Mixup

        if mixup <= 0 and cutmix <= 0:
            raise FmktError("BatchMixer needs data.mixup > 0 or data.cutmix > 0.")
        self.mixup = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=1.0, switch_prob=SWITCH_PROB,
                           mode="batch", label_smoothing=0.0, num_classes=int(num_classes))
        self.seed, self.rank = int(seed), int(rank)

    def generator(self, epoch: int, step: int) -> torch.Generator:
        words = [self.seed & _MASK, int(epoch) & _MASK, int(step) & _MASK, self.rank & _MASK, MIX_STREAM]
        state = np.random.SeedSequence(words).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int):
        if images.shape[0] % 2:
            raise FmktError(f"Mixup/CutMix needs an even batch per process, got {images.shape[0]} images.")
        with seeded_global_rngs(self.generator(epoch, step)):
            return self.mixup(images, labels)


class MixingStep:
    """The run's step with each batch mixed first: ``(images, labels, progress) -> losses``. ``progress`` is the
    engine's ``epoch + step / iters``, from which the batch's (epoch, step) are read back exactly."""

    def __init__(self, step, mixer: BatchMixer, iters: int):
        self.step, self.mixer, self.iters = step, mixer, int(iters)

    def __call__(self, images, labels, progress: float = 0.0) -> dict:
        epoch = int(progress)
        images, targets = self.mixer(images, labels, epoch, round((progress - epoch) * self.iters))
        return self.step(images, targets, progress)


def with_mixing(step, run):
    """``step`` itself when ``run.cfg`` asks for no Mixup/CutMix (a default run is untouched), else a
    :class:`MixingStep` around it (``run``: fmkt.engine's Run)."""
    d = run.cfg.data
    if not d.mixup and not d.cutmix:
        return step
    if (d.batch_size // run.world) % 2:
        raise FmktError(f"Mixup/CutMix needs an even batch per process; data.batch_size {d.batch_size} over "
                        f"{run.world} processes gives {d.batch_size // run.world}.")
    mixer = BatchMixer(d.mixup, d.cutmix, run.data.num_classes, seed=run.cfg.train.seed, rank=run.rank)
    return MixingStep(step, mixer, len(run.loader))
