"""FM-KT (serial training), FM-KT^Theta and OFM-KT; the method in our words: docs/method.md.

Per iteration with N steps (fixed, or drawn from a set):
    Z0 = teacher(X) (no grad), Dirac ratio applied to a copy
    Z1 = student features; the shared sampler yields the pooled estimate of each step
    y_i = S(estimate_i) (the student's own head); loss = sum_i (1/N) * (w * D(y_i, Z0) + ce_weight * CE(y_i, labels))
Nothing inside the flow is detached; train-time logits are mean_i y_i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmkt.distillers.base import Distiller, warmup_ends, warmup_factor
from fmkt.errors import FmktError
from fmkt.losses import build_metric_loss, ce_loss, pkd_loss


def apply_dirac_ratio(target: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``target`` (B, ...) where round((1 - ratio) * B) rows trade targets among themselves.

    The rows to shuffle are chosen at random and moved by a cyclic shift of a random order, so each of them
    gets another row's target (none keeps its own): exactly the stated fraction is decoupled. The caller's
    tensor is never modified.
    """
    if not 0.0 <= ratio <= 1.0:
        raise FmktError(f"dirac_ratio must be in [0, 1], got {ratio}.")
    b = target.shape[0]
    n_shuffle = b - int(round(ratio * b))
    if n_shuffle < 2:
        return target.clone()
    rows = torch.randperm(b, generator=generator)[:n_shuffle].to(target.device)
    index = torch.arange(b, device=target.device)
    index[rows] = rows.roll(1)
    return target.index_select(0, index)


def draw_train_steps(choices: list[int]) -> int:
    if len(choices) == 1:
        return choices[0]
    return choices[int(torch.randint(len(choices), (1,)).item())]


class FMKTDistiller(Distiller):
    """``fmkt``: logit transfer (S replaces the student head), or feature transfer with PKD velocity regression."""

    def __init__(self, student, teacher, cfg, input_shape=None):
        super().__init__(student, teacher, cfg, input_shape)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if not student.is_flow:
            raise FmktError("FM-KT needs a student built with a meta-encoder.")
        self.metric = build_metric_loss(cfg.loss, standardize=cfg.logit_standardization, **cfg.loss_params)
        self.train_step_choices = cfg.train_step_choices()
        self.teacher_projection = None
        if student.transfer == "features":
            self.teacher_projection = self._build_teacher_projection()

    @classmethod
    def capture_refusal(cls, cfg, **options) -> str | None:
        if len(cfg.train_step_choices()) > 1:
            return "method.train_steps draws N per iteration, so every step is another graph"
        if cfg.dirac_ratio < 1.0:
            return "the Dirac ratio draws a new permutation on the host every step"
        return None

    @classmethod
    def steady_from(cls, cfg, **options) -> float:
        return warmup_ends(cfg, cfg.loss)

    def _build_teacher_projection(self):
        """BN + strided 1x1 conv bringing the teacher's last map to the student's (C, H, W)."""
        if self.teacher is None:
            return None
        if self.input_shape is None:
            raise FmktError("feature transfer needs the input shape to size the teacher projection.")
        device = next(self.student.parameters()).device
        probe = torch.zeros(2, *self.input_shape, device=device)
        was_training = self.student.training
        self.student.eval()  # the probe must not touch BatchNorm statistics
        with torch.no_grad():
            zt = self.teacher.features(probe)
            zs = self.student.features(probe)
        self.student.train(was_training)
        ct, ht = zt.shape[1], zt.shape[2]
        cs, hs = zs.shape[1], zs.shape[2]
        stride = ht // hs if hs and ht % hs == 0 else 1
        return nn.Sequential(nn.BatchNorm2d(ct), nn.Conv2d(ct, cs, 1, stride=stride, bias=False)).to(device)

    def _ce(self, logits, labels):
        return ce_loss(logits, labels, self.cfg.label_smoothing)

    def _steps(self) -> int:
        return draw_train_steps(self.train_step_choices) if self.training else self.train_step_choices[-1]

    def forward_train(self, images, labels, progress=0.0):
        if self.student.transfer == "features":
            return self._forward_features(images, labels, progress)
        _, logits, losses = self._logit_transfer(images, labels, progress)
        return logits, losses

    def _logit_transfer(self, images, labels, progress):
        """The serial FM-KT loop on logits -> (Z1, ensemble logits, {"loss_ce", "loss_kd"})."""
        cfg, n = self.cfg, self._steps()
        z0 = apply_dirac_ratio(self.teacher_logits(images), cfg.dirac_ratio)
        z1 = self.student.features(images)
        out = self.student.sample(z1, n)
        wf = warmup_factor(cfg, progress)
        preds = self.student.step_logits(out)
        loss_kd = sum(self.metric(y, z0, labels, wf) for y in preds) * (cfg.loss_weight / n)
        loss_ce = sum(self._ce(y, labels) for y in preds) * (cfg.ce_weight / n)
        logits = torch.stack(preds, 0).mean(0)
        return z1, logits, {"loss_ce": loss_ce, "loss_kd": loss_kd}

    def _forward_features(self, images, labels, progress):
        """Feature transfer: regress each step's velocity onto a'(t) Z1 + s'(t) T(Z0) with PKD."""
        cfg, n = self.cfg, self._steps()
        with torch.no_grad():
            zt = self.teacher.features(images).float()
        z1 = self.student.features(images)
        z0 = self.teacher_projection(zt)
        if z0.shape[-2:] != z1.shape[-2:]:
            z0 = F.adaptive_avg_pool2d(z0, z1.shape[-2:])
        z0 = apply_dirac_ratio(z0, cfg.dirac_ratio)
        out = self.student.sample(z1, n, return_velocities=True)
        sched = self.student.schedule
        steps = sched.steps(n)
        # the target in fp32 at the schedule's clamped time (VP's s'(1) is infinite)
        loss_flow = sum(
            pkd_loss(v.float(), sched.target_velocity(z1, z0, c.t)) for v, c in zip(out.velocities, steps)
        ) * (cfg.loss_weight / n)
        logits = self.student.map_head(out.final_state)
        return logits, {"loss_ce": cfg.ce_weight * self._ce(logits, labels), "loss_flow": loss_flow}


class ThetaDistiller(FMKTDistiller):
    """``theta`` (FM-KT^Theta): FM-KT plus a head on Z1 matched to the detached step ensemble (+ CE)."""

    def __init__(self, student, teacher, cfg, input_shape=None):
        if student.theta_head is None:
            raise FmktError("FM-KT^Theta needs a student built with a theta head.")
        super().__init__(student, teacher, cfg, input_shape)

    def forward_train(self, images, labels, progress=0.0):
        z1, logits, losses = self._logit_transfer(images, labels, progress)
        theta = self.student.theta_head(F.adaptive_avg_pool2d(z1, 1).flatten(1))
        wf = warmup_factor(self.cfg, progress)
        losses["loss_theta"] = self.cfg.theta_weight * (
            self.metric(theta, logits.detach(), labels, wf) + self.cfg.ce_weight * self._ce(theta, labels))
        return logits, losses


class OFMKTDistiller(FMKTDistiller):
    """``ofmkt`` (OFM-KT): no teacher; each step gets label-smoothed CE plus D against the detached mean."""

    needs_teacher = False

    @classmethod
    def capture_refusal(cls, cfg, **options) -> str | None:
        if len(cfg.train_step_choices()) > 1:
            return "method.train_steps draws N per iteration, so every step is another graph"
        return None  # no teacher, so no Dirac ratio

    def forward_train(self, images, labels, progress=0.0):
        cfg, n = self.cfg, self._steps()
        z1 = self.student.features(images)
        out = self.student.sample(z1, n)
        preds = self.student.step_logits(out)
        logits = torch.stack(preds, 0).mean(0)
        target = logits.detach()
        wf = warmup_factor(cfg, progress)
        eps = cfg.online_label_smoothing
        return logits, {
            "loss_ce": sum(ce_loss(y, labels, eps) for y in preds) * (cfg.ce_weight / n),
            "loss_kd": sum(self.metric(y, target, labels, wf) for y in preds) * (cfg.loss_weight / n),
        }
