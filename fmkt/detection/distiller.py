"""Detection distillers: a torchvision student detector, a frozen teacher detector, and a loss dict.

``DetectionDistiller(student, teacher, flow, method=)``, ``forward_train(images, targets) -> (loss, losses)`` with
``loss = sum(losses.values())`` (every entry already weighted, as the classification distillers' dicts):

- ``fmkt``: the student's own detection losses on the FPN maps refined by the flow (the authors' neck hands the end
  states to the heads), plus ``loss_flow_<level>`` = w_l * L_l (:class:`fmkt.detection.fpn_flow.FPNFlow`). With
  ``refine=False`` the heads see the raw maps and the flow is a training-only auxiliary loss (ours; the deployable
  student is then the plain detector).
- ``pkd``: the baseline, mmrazor's PKD on each level, ``loss_pkd_<level>`` = w_l * PKD(student map, teacher map),
  weights 6 (Faster R-CNN) / 10 (RetinaNet) on all levels but the last (SOURCES["pkd"] in fpn_flow).
- ``none``: the student alone.

The student's backbone runs once per step: this module does what torchvision's ``GeneralizedRCNN.forward`` /
``RetinaNet.forward`` do in training (transform, backbone, then rpn + roi_heads or head + compute_loss), with the
maps in between handed to the flow. The teacher (eval mode, no gradients) sees the student's transformed batch,
renormalised to its own mean/std if they differ, so every level has the student's size.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fmkt.detection.fpn_flow import FPNFlow, attach_flow, check_same_size, default_level_weights
from fmkt.detection.models import detector_backbone, fpn_features
from fmkt.distillers.base import FrozenTeacher
from fmkt.errors import FmktError
from fmkt.flow.schedules import fp32
from fmkt.losses import pkd_loss

METHODS = ("fmkt", "pkd", "none")


def detector_kind(detector: nn.Module) -> str:
    """``rcnn`` (GeneralizedRCNN: rpn + roi_heads) or ``retinanet`` (head + compute_loss)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if isinstance(detector, GeneralizedRCNN):
        return "rcnn"
    if isinstance(detector, RetinaNet):
        return "retinanet"
    raise FmktError(f"{type(detector).__name__} is not a torchvision GeneralizedRCNN (Faster R-CNN) or RetinaNet; "
                    "the detection distillers drive those two.")


def head_losses(detector: nn.Module, image_list, features: OrderedDict, targets: list) -> dict:
    """The detector's own training losses on given FPN ``features`` (torchvision's forward after the backbone)."""
    if detector_kind(detector) == "rcnn":
        proposals, rpn_losses = detector.rpn(image_list, features, targets)
        _, roi_losses = detector.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**roi_losses, **rpn_losses}
    maps = list(features.values())
    head_outputs = detector.head(maps)
    anchors = detector.anchor_generator(image_list, maps)
    losses = detector.compute_loss(targets, head_outputs, anchors)
    return {(k if k.startswith("loss_") else f"loss_{k}"): v for k, v in losses.items()}


def check_targets(targets) -> None:
    """Boxes (N, 4) with x2 > x1 and y2 > y1, as torchvision's forward asserts, as one sentence."""
    if targets is None:
        raise FmktError("training a detector needs targets: one dict with 'boxes' and 'labels' per image.")
    for i, t in enumerate(targets):
        boxes = t.get("boxes") if isinstance(t, dict) else None
        if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise FmktError(f"target {i} needs 'boxes' as a float tensor of shape (N, 4) (x1, y1, x2, y2).")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            raise FmktError(f"target {i} has a box of zero or negative size, {boxes[bad][0].tolist()}; drop "
                            "such boxes before training.")


def renormalize(x: torch.Tensor, src, dst) -> torch.Tensor:
    """A batch normalised by ``src`` (a GeneralizedRCNNTransform) re-expressed in ``dst``'s normalisation."""
    if list(src.image_mean) == list(dst.image_mean) and list(src.image_std) == list(dst.image_std):
        return x
    def col(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * col(src.image_std) + col(src.image_mean) - col(dst.image_mean)) / col(dst.image_std)


class DetectionDistiller(FrozenTeacher):
    """Trains ``student`` (and ``flow``) against a frozen ``teacher``; see the module docstring."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, flow: FPNFlow | None = None, *,
                 method: str = "fmkt", refine: bool = True, pkd_weights=None):
        super().__init__()
        if method not in METHODS:
            raise FmktError(f"unknown detection method {method!r}; choose one of {', '.join(METHODS)}.")
        if method != "none" and teacher is None:
            raise FmktError(f"method {method!r} needs a teacher detector.")
        if method == "fmkt" and flow is None:
            raise FmktError("method 'fmkt' needs an FPNFlow (one flow module per FPN level).")
        self.kind = detector_kind(student)
        self.method, self.refine = method, bool(refine)
        self.student, self.flow = student, (flow if method == "fmkt" else None)
        if method != "none":
            detector_kind(teacher)
        self.freeze_teacher(teacher if method != "none" else None)  # eval, no gradients, not learnable state
        self.pkd_weights = None if pkd_weights is None else {str(k): float(w) for k, w in dict(pkd_weights).items()}

    def teacher_features(self, batch: torch.Tensor) -> OrderedDict:
        """The teacher's FPN maps of the student's transformed batch (no gradients)."""
        with torch.no_grad():
            x = renormalize(batch, self.student.transform, self.teacher.transform)
            feats = detector_backbone(self.teacher)(x)
        return feats if isinstance(feats, dict) else OrderedDict([("0", feats)])

    def forward_train(self, images: list, targets: list):
        """(loss, {"loss_classifier": ..., "loss_box_reg": ..., ..., "loss_flow_<level>" | "loss_pkd_<level>"})."""
        if not self.training:
            raise FmktError("forward_train needs training mode (call .train()): the detectors' heads return losses "
                            "only then.")
        check_targets(targets)
        image_list, targets, feats = fpn_features(self.student, images, targets)
        extra, head_feats = {}, feats
        if self.method != "none":
            teacher = self.teacher_features(image_list.tensors)
            if self.method == "fmkt":
                out = self.flow(feats, teacher)
                extra = {f"loss_flow_{k}": self.flow.weights[k] * v for k, v in out.per_level.items()}
                head_feats = out.refined if self.refine else feats
            else:
                extra = self._pkd(feats, teacher)
        losses = {**head_losses(self.student, image_list, head_feats, targets), **extra}
        return sum(losses.values()), losses

    def _pkd(self, student: dict, teacher: dict) -> dict:
        levels = list(student)
        weights = self.pkd_weights or dict(zip(levels, default_level_weights(self.student, levels)))
        out = {}
        for level, w in weights.items():
            if w > 0:
                check_same_size(level, student[level], teacher[level])
                out[f"loss_pkd_{level}"] = w * pkd_loss(fp32(student[level]), fp32(teacher[level]))
        return out

    def deployable(self, steps: int | None = None) -> nn.Module:
        """The student as it runs at inference: with the flow (K = ``steps``) on its FPN maps for ``fmkt`` with
        ``refine`` (the authors' inference), the plain student otherwise. Shares the student's parameters."""
        if self.method == "fmkt" and self.refine:
            return attach_flow(self.student, self.flow, steps)
        return self.student
