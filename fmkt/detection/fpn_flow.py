"""FM-KT's feature transfer on a detector's FPN: one flow module per level (issue 23).

Per level l with weight w_l > 0 and N Euler steps (fmkt's one sampler, :func:`fmkt.flow.sampler.run_sampler`):

    Z1 = the student's level map, Z0 = T(the teacher's level map), T = BatchNorm + 1x1 conv (teacher -> student
    channels), Dirac ratio applied to a copy of Z0
    v_i = encoder(x + e(t_i)),  x <- x - v_i / N                      (t_i = 1, (N-1)/N, ..., 1/N)
    L_l = (1/N) sum_i D(v_i, a'(t_i) Z1 + s'(t_i) Z0)                 (rectified flow: the target is Z1 - Z0)
    total = sum_l w_l * L_l;  the end state x is the level's refined map

D is PKD (:data:`fmkt.losses.LOSSES` ``pkd``; ``mse`` also fits). A level with weight 0 builds no module and passes
its map through unchanged (theirs: ``if self.weight == 0: return 0, student_feature``). Defaults follow the authors'
detection code (mmrazor/mmdet 3; the sources are in :data:`SOURCES`): weights [6, 6, 6, 6, 0] for Faster R-CNN and
[10, 10, 10, 10, 0] for RetinaNet, Dirac ratio 1, PKD, N drawn from {1, 2, 4, 8, 16} at every training iteration
and K = 4 at inference (their neck's ``forward(..., inference_sampling=4)``). On N: their FlowAlignmentFPN passes
``sampling=8`` to each level's FlowAlignModule, but in every FlowAlignModule we could read (the one that takes
``encoder_type``, as their detection configs do, included) a feature-based module trains with
``np.random.choice([1, 2, 4, 8, 16])`` and reads ``sampling`` only on its logit path; the detection copy of that file
was not readable. Their neck hands the refined maps to the heads, in training and at inference:
:class:`RefinedBackbone` / :func:`attach_flow` make that deployable student (K steps fixed). They detach nothing:
the student's map gets gradient through the velocities and through the target Z1 - T(teacher);
``detach_target=True`` (config ``detection.detach_target``, ours) drops the latter (BENCHMARKS.md measures both).
Ours where theirs differs or is not visible: the time embedding and encoders are fmkt's (their detection configs
name an encoder ``convnext_detection``, a ConvNeXt block, which fmkt does not register; any ``channels -> Module``
factory plugs in); N is drawn once per iteration for all levels (theirs per level); no EMA copy of the flows (one
version of their neck keeps one, decay 0.999, for inference; the other does not).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from fmkt.distillers.flow import apply_dirac_ratio, draw_train_steps
from fmkt.errors import FmktError
from fmkt.flow.encoders import TimeEmbedding, build_encoder
from fmkt.flow.sampler import run_sampler
from fmkt.flow.schedules import build_schedule, fp32
from fmkt.losses import LOSSES

FASTER_RCNN_WEIGHTS = (6.0, 6.0, 6.0, 6.0, 0.0)
RETINANET_WEIGHTS = (10.0, 10.0, 10.0, 10.0, 0.0)
TRAIN_STEPS = (1, 2, 4, 8, 16)
EVAL_STEPS = 4
SOURCES = {
    "weights": "the authors' mmdet configs faster-rcnn_r50_fpn_2x_coco_fakd.py (weight=[6]*4+[0]*1) and "
               "retinanet_r50_fpn_2x_coco_fakd.py (weight=[10]*4+[0]*1, dirac_ratio=1, SGD lr 0.01)",
    "projection": "their FlowAlignModule's lowermodule (BatchNorm2d + 1x1 conv, teacher -> student channels) "
                  "on the teacher map, in every version of it we could read (the detection one was not readable)",
    "steps": "their mmrazor FlowAlignmentFPN: FlowAlignModule(..., sampling=8, encoder_type=...) per level, "
             "forward(..., inference_sampling=4) also at test time (extract_feat returns the refined maps); their "
             "FlowAlignModule (shaoshitong's FM-KT code, the version with encoder_type): feature_based training "
             "draws inference_sampling = np.random.choice([1, 2, 4, 8, 16]) per call, sampling is read only by "
             "the logit-based path",
    "pkd": "open-mmlab/mmrazor@617fd9576658e33b139ca55a72e52432321d3a01:"
           "configs/distill/mmdet/pkd/pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py (PKDLoss loss_weight=6 on fpn0-3); "
           "open-mmlab/mmrazor@2ce36c43c81ec7daede2013f169d24d96385dbee:"
           "configs/distill/mmdet/pkd/pkd_fpn_retina_x101_retina_r50_2x_coco.py (loss_weight=10)",
}


def default_level_weights(detector: nn.Module, levels: Sequence[str]) -> tuple[float, ...]:
    """The authors' per-level weights for this detector family (RetinaNet 10, Faster R-CNN and others 6) over
    ``levels``: every level but the last (the extra top level P6/P7, 'pool' or 'p7') weighted, the last 0. For a
    5-level FPN that is exactly their [6, 6, 6, 6, 0] / [10, 10, 10, 10, 0]; other counts follow the same pattern."""
    from torchvision.models.detection import RetinaNet

    w = RETINANET_WEIGHTS[0] if isinstance(detector, RetinaNet) else FASTER_RCNN_WEIGHTS[0]
    return tuple(w for _ in levels[:-1]) + (0.0,)


def feature_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """D for feature maps: a :data:`LOSSES` entry that compares maps (pkd, mse), not logits."""
    entry = LOSSES.get(name)
    if entry is None or entry.logits or entry.uses_target:
        maps = [k for k, v in LOSSES.items() if not v.logits and not v.uses_target]
        raise FmktError(f"the FPN flow's loss must compare feature maps: one of {', '.join(maps)}, not {name!r}.")
    return entry.fn


def check_same_size(level: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise FmktError(f"FPN level {level!r}: the student's map is {tuple(student.shape)} but the teacher's is "
                        f"{tuple(teacher.shape)}; feed both backbones the same batch (the student's transformed "
                        "images), so their FPN levels have the same strides and sizes.")


class LevelFlow(nn.Module):
    """The flow of one FPN level: a meta-encoder, its time embedding and the teacher projection T."""

    def __init__(self, channels: int, teacher_channels: int | None = None, *, encoder="conv",
                 schedule: str = "rectified", project_teacher: bool = True):
        super().__init__()
        teacher_channels = channels if teacher_channels is None else teacher_channels
        self.encoder = build_encoder(encoder, channels) if isinstance(encoder, str) else encoder(channels)
        self.time_embed = TimeEmbedding(channels)
        self.schedule = build_schedule(schedule)
        if project_teacher:  # the authors' lowermodule: BN + 1x1 conv, teacher -> student channels
            self.teacher_projection = nn.Sequential(nn.BatchNorm2d(teacher_channels),
                                                    nn.Conv2d(teacher_channels, channels, 1, bias=False))
        elif teacher_channels != channels:
            raise FmktError(f"the teacher's FPN has {teacher_channels} channels and the student's {channels}: keep "
                            "project_teacher on (a 1x1 conv brings the teacher's map to the student's channels).")
        else:
            self.teacher_projection = nn.Identity()

    def sample(self, z1: torch.Tensor, steps: int, velocities: bool = False):
        return run_sampler(z1, self.encoder, self.time_embed, self.schedule.steps(steps),
                           return_velocities=velocities)

    def loss(self, z1, teacher_map, steps: int, metric, dirac_ratio: float = 1.0, detach_target: bool = False):
        """(L_l, the refined map): the mean over the N steps of D(v_i, target velocity), unweighted. With
        ``detach_target`` the target velocity's copy of Z1 carries no gradient (Z1 still gets the one through v_i)."""
        z0 = apply_dirac_ratio(self.teacher_projection(teacher_map), dirac_ratio)
        out = self.sample(z1, steps, velocities=True)
        consts = self.schedule.steps(steps)
        z1_target = z1.detach() if detach_target else z1
        total = sum(metric(fp32(v), self.schedule.target_velocity(z1_target, z0, c.t))
                    for v, c in zip(out.velocities, consts))
        return total / steps, out.final_state.to(z1.dtype)


@dataclass
class FlowLoss:
    total: torch.Tensor  # sum over levels of weight * loss
    per_level: dict  # level -> unweighted loss L_l (levels with a module only)
    refined: OrderedDict  # every level: the end state where a module ran, the student's map elsewhere


class FPNFlow(nn.Module):
    """One :class:`LevelFlow` per weighted FPN level; ``weights`` is a plain dict (level -> float) read per call."""

    def __init__(self, levels: Sequence[str], channels: int, weights: Sequence[float], *,
                 teacher_channels: int | None = None, encoder="conv", schedule: str = "rectified",
                 train_steps: int | Sequence[int] = TRAIN_STEPS, eval_steps: int = EVAL_STEPS,
                 dirac_ratio: float = 1.0, loss: str = "pkd", project_teacher: bool = True,
                 detach_target: bool = False):
        super().__init__()
        levels = tuple(str(k) for k in levels)
        self.detach_target = bool(detach_target)
        if len(weights) != len(levels):
            raise FmktError(f"{len(weights)} FPN loss weights for {len(levels)} levels ({', '.join(levels)}): give "
                            "one weight per level (0 turns a level off).")
        if any(float(w) < 0 for w in weights):
            raise FmktError(f"FPN loss weights must be >= 0, got {list(weights)}.")
        self.levels = levels
        self.weights = {k: float(w) for k, w in zip(levels, weights)}
        self.train_steps = [train_steps] if isinstance(train_steps, int) else list(train_steps)
        if not self.train_steps or any(not isinstance(n, int) or n < 1 for n in self.train_steps + [eval_steps]):
            raise FmktError(f"flow steps must be integers >= 1, got train {train_steps!r}, eval {eval_steps!r}.")
        self.eval_steps, self.dirac_ratio, self.loss_name = eval_steps, float(dirac_ratio), loss
        self.metric = feature_loss(loss)
        self.flows = nn.ModuleDict({
            k: LevelFlow(channels, teacher_channels, encoder=encoder, schedule=schedule,
                         project_teacher=project_teacher)
            for k in levels if self.weights[k] > 0})

    def steps(self, steps: int | None = None) -> int:
        if steps is not None:
            return steps
        return draw_train_steps(self.train_steps) if self.training else self.eval_steps

    def forward(self, student: dict, teacher: dict, steps: int | None = None) -> FlowLoss:
        """The weighted flow loss over the levels and the refined maps (one N for every level)."""
        n = self.steps(steps)
        per_level, refined = {}, OrderedDict(student)
        for level, flow in self.flows.items():
            if level not in student or level not in teacher:
                side, maps = ("student", student) if level not in student else ("teacher", teacher)
                raise FmktError(f"FPN level {level!r} is missing from the {side}'s maps (levels: "
                                f"{', '.join(maps)}); build the flow for the detectors' own levels.")
            check_same_size(level, student[level], teacher[level])
            per_level[level], refined[level] = flow.loss(student[level], teacher[level], n, self.metric,
                                                         self.dirac_ratio, self.detach_target)
        total = sum((self.weights[k] * v for k, v in per_level.items()),
                    start=next(iter(student.values())).new_zeros(()))
        return FlowLoss(total, per_level, refined)

    def refine(self, student: dict, steps: int | None = None) -> OrderedDict:
        """Inference: each weighted level's map moved K steps by its flow (no teacher); the others as they are."""
        n = self.steps(steps)
        out = OrderedDict(student)
        for level, flow in self.flows.items():
            out[level] = flow.sample(student[level], n).final_state.to(student[level].dtype)
        return out


class RefinedBackbone(nn.Module):
    """A detector backbone whose FPN maps are refined by ``flow`` with K = ``steps``: what the heads see at inference
    in the authors' code. ``raw`` is the detector's own backbone; ``out_channels`` is its."""

    def __init__(self, raw: nn.Module, flow: FPNFlow, steps: int | None = None):
        super().__init__()
        self.raw, self.flow = raw, flow
        self.steps = flow.eval_steps if steps is None else int(steps)
        self.out_channels = raw.out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.flow.refine(self.raw(x), self.steps)


def attach_flow(detector: nn.Module, flow: FPNFlow, steps: int | None = None) -> nn.Module:
    """A detector that runs ``flow`` (K = ``steps``, default the flow's eval steps) on its FPN maps: a shallow copy
    of ``detector`` sharing every module and parameter, whose backbone is a :class:`RefinedBackbone`."""
    if isinstance(detector.backbone, RefinedBackbone):
        raise FmktError("this detector already runs an FPN flow; attach it to the plain student.")
    out = copy.copy(detector)
    out._modules = OrderedDict(detector._modules)  # a new child table: the original keeps its own backbone
    out.backbone = RefinedBackbone(detector.backbone, flow, steps)
    return out
