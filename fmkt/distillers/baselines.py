"""The baselines users compare against: the student alone (CE), KD, DKD and DIST on logits."""
from __future__ import annotations

from fmkt.distillers.base import Distiller, warmup_factor
from fmkt.losses import build_metric_loss, ce_loss


class VanillaDistiller(Distiller):
    """``none``: the student alone with cross-entropy (also how teachers are trained)."""

    needs_teacher = False

    def forward_train(self, images, labels, progress=0.0):
        logits = self.student(images)
        return logits, {"loss_ce": ce_loss(logits, labels, self.cfg.label_smoothing)}


class LogitKDDistiller(Distiller):
    """``kd`` / ``dkd`` / ``dist``: ce_weight * CE + loss_weight * D(student logits, teacher logits)."""

    def __init__(self, student, teacher, cfg, input_shape=None, loss_name: str = "kd"):
        super().__init__(student, teacher, cfg, input_shape)
        self.metric = build_metric_loss(loss_name, standardize=cfg.logit_standardization, **cfg.loss_params)

    def forward_train(self, images, labels, progress=0.0):
        logits = self.student(images)
        target = self.teacher_logits(images)
        return logits, {
            "loss_ce": self.cfg.ce_weight * ce_loss(logits, labels, self.cfg.label_smoothing),
            "loss_kd": self.cfg.loss_weight * self.metric(logits, target, labels, warmup_factor(self.cfg, progress)),
        }
