"""The baselines users compare against: the student alone (CE), KD, DKD and DIST on logits."""
from __future__ import annotations

from fmkt.distillers.base import Distiller, warmup_ends, warmup_factor
from fmkt.losses import build_metric_loss, ce_loss


class VanillaDistiller(Distiller):
    """``none``: the student alone with cross-entropy (also how teachers are trained)."""

    needs_teacher = False

    @classmethod
    def capture_refusal(cls, cfg, **options) -> str | None:
        return None  # cross-entropy on a fixed batch shape: the same computation every step

    def forward_train(self, images, labels, progress=0.0):
        logits = self.student(images)
        return logits, {"loss_ce": ce_loss(logits, labels, self.cfg.label_smoothing)}


class LogitKDDistiller(Distiller):
    """``kd`` / ``dkd`` / ``dist``: ce_weight * CE + loss_weight * D(student logits, teacher logits)."""

    def __init__(self, student, teacher, cfg, input_shape=None, loss_name: str = "kd"):
        super().__init__(student, teacher, cfg, input_shape)
        self.metric = build_metric_loss(loss_name, standardize=cfg.logit_standardization, **cfg.loss_params)

    @classmethod
    def capture_refusal(cls, cfg, loss_name: str = "kd") -> str | None:
        return None  # teacher and student forward, CE + D: no host decision per step

    @classmethod
    def steady_from(cls, cfg, loss_name: str = "kd") -> float:
        return warmup_ends(cfg, loss_name)

    def forward_train(self, images, labels, progress=0.0):
        logits = self.student(images)
        target = self.teacher_logits(images)
        return logits, {
            "loss_ce": self.cfg.ce_weight * ce_loss(logits, labels, self.cfg.label_smoothing),
            "loss_kd": self.cfg.loss_weight * self.metric(logits, target, labels, warmup_factor(self.cfg, progress)),
        }
