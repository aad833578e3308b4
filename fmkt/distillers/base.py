"""Distillers wire a student, a frozen teacher and a loss dict (mdistiller's shape, without DataParallel).

``forward_train(images, labels, progress) -> (logits, {"loss_ce": ..., "loss_kd": ...})``; the engine sums the
dict. ``progress`` is the fractional epoch (DKD's warm-up reads it). ``labels``: (B,) class indices, or (B, K)
soft targets under Mixup/CutMix (fmkt.mixing): CE takes either, DKD the soft target's argmax (fmkt.losses). Only the student (and any module the
method adds, e.g. FM-KT's teacher projection) is trained; the teacher stays in eval mode with gradients off.
Every distiller is built as ``cls(student, teacher, cfg, input_shape, **options)`` (fmkt.distillers.METHODS).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fmkt.losses import LOSSES
from fmkt.student import DeployableModel


class FrozenTeacher(nn.Module):
    """A module holding ``self.teacher`` frozen: eval mode whatever ``train()`` says, no gradients, never in the
    learnable state (the classification distillers and fmkt.detection's)."""

    def freeze_teacher(self, teacher: nn.Module | None) -> None:
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def learnable_state_dict(self) -> dict:
        """Everything trained (the student and what the method adds), never the teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}


class Distiller(FrozenTeacher):
    needs_teacher = True

    def __init__(self, student: DeployableModel, teacher: DeployableModel | None, cfg, input_shape=None):
        super().__init__()
        self.student = student
        self.freeze_teacher(teacher)
        self.cfg = cfg

    def load_learnable_state_dict(self, state: dict) -> None:
        # checkpoints written before the teacher projection had its name kept it under "adapter."
        state = {("teacher_projection." + k[len("adapter."):] if k.startswith("adapter.") else k): v
                 for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")

    # -- what the fast path may do with this method's step (fmkt.capture asks; it names no method itself) ------
    @classmethod
    def capture_refusal(cls, cfg, **options) -> str | None:
        """Why this method's training step under ``cfg`` (the MethodConfig) is not one fixed computation that a
        CUDA graph can record once and replay: anything decided on the host per step (a random draw, a shape, a
        Python number that changes). None: it is, from :meth:`steady_from` on. A method must say so itself: the
        default refuses, so a new method is never captured wrongly by accident."""
        return f"{cls.__name__} does not say whether its step can be captured (define capture_refusal)"

    @classmethod
    def steady_from(cls, cfg, **options) -> float:
        """The fractional epoch from which every step is the same computation (the graph records ``progress`` as
        a constant): 0, or the end of DKD's warm-up where the metric reads the warm-up factor."""
        return 0.0

    @torch.no_grad()
    def teacher_logits(self, images):
        return self.teacher(images).float()

    def forward_train(self, images, labels, progress: float = 0.0):
        raise NotImplementedError

    def forward(self, images, labels, progress: float = 0.0):
        # DDP wraps forward(); everything goes through forward_train.
        return self.forward_train(images, labels, progress)


def warmup_factor(cfg, progress: float) -> float:
    """DKD's warm-up as mdistiller computes it: ``min(epoch / WARMUP, 1)`` with epochs counted from 1, so the
    factor holds for a whole epoch and is already 1/WARMUP in the first (``progress``: the fractional epoch, from
    0). mdistiller's ImageNet configs use WARMUP 1 (factor 1 from the first step), fmkt's recipes 0 (the same)."""
    if cfg.dkd_warmup_epochs <= 0:
        return 1.0
    return min((math.floor(progress) + 1) / cfg.dkd_warmup_epochs, 1.0)


def warmup_ends(cfg, metric: str) -> float:
    """The first epoch (0-based) whose warm-up factor is 1 when ``metric`` reads it (DKD), else 0."""
    if not LOSSES[metric].uses_target or cfg.dkd_warmup_epochs <= 0:
        return 0.0
    return float(max(math.ceil(cfg.dkd_warmup_epochs) - 1, 0))
