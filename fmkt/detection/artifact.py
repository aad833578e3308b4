"""The detection artifact: the deployable student detector as ``model.safetensors`` + ``fmkt.json`` (issue 23).

The folder is :mod:`fmkt.artifact`'s (its writer, reader and sha256 check are reused): ``fmkt.json`` holds the spec
under ``"model"``, the run record's keys beside it, and ``weights_sha256``. The spec says everything needed to
rebuild the module without the training config::

    {"task": "detection", "detector": "fasterrcnn_resnet18_fpn" (a registered name or pkg.module:factory),
     "num_classes": 4 (with the background), "min_size": 128, "max_size": 128,
     "options": {"box_score_thresh": 0.05, ...} (JSON-able keyword arguments of the detector; optional),
     "flow": None | {"levels", "weights", "encoder", "schedule", "project_teacher", "teacher_channels",
                     "train_steps", "eval_steps", "dirac_ratio", "loss"},
     "default_steps": K (the flow's Euler steps at inference; 0 without a flow),
     "frozen_backbone_bn": true, "trainable_backbone_layers": 3 (only for a student whose backbone body started
     from an ImageNet classifier file: fmkt.detection.backbone's freezing, which the rebuild applies)}

With a flow the model is the detector with its :class:`FPNFlow` attached (:func:`attach_flow`, K = default_steps):
the refined FPN maps feed the heads, as the authors' inference does. A spec without the two backbone keys (every
artifact written before them) is a detector built from scratch. :func:`flow_spec` and :func:`detector_spec`
write the spec from the built objects. A wrong spec or a tampered weight file is one FmktError sentence.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fmkt.artifact import META, WEIGHTS, read_meta, read_weights, save_artifact
from fmkt.errors import FmktError, first_line

TASK = "detection"
SPEC_KEYS = ("task", "detector", "num_classes", "min_size", "max_size", "flow", "default_steps")
FLOW_KEYS = ("levels", "weights", "encoder", "schedule", "project_teacher")
FLOW_OPTIONAL = ("teacher_channels", "train_steps", "eval_steps", "dirac_ratio", "loss")
BACKBONE_KEYS = ("frozen_backbone_bn", "trainable_backbone_layers")  # optional, both or neither


def flow_spec(flow) -> dict:
    """The spec's ``"flow"`` of a built :class:`fmkt.detection.fpn_flow.FPNFlow` (its encoder must be a name)."""
    first = next(iter(flow.flows.values()), None)
    projection = getattr(first, "teacher_projection", None)
    project = isinstance(projection, nn.Sequential)
    encoder = _encoder_name(first)
    return {"levels": list(flow.levels), "weights": [flow.weights[k] for k in flow.levels], "encoder": encoder,
            "schedule": first.schedule.name if first is not None else "rectified", "project_teacher": project,
            "teacher_channels": projection[0].num_features if project else None,
            "train_steps": list(flow.train_steps), "eval_steps": flow.eval_steps, "dirac_ratio": flow.dirac_ratio,
            "loss": flow.loss_name}


def _encoder_name(level) -> str:
    from fmkt.flow.encoders import ENCODERS

    if level is None:  # every level weighted 0: no module, no encoder to rebuild
        return "conv"
    for name, cls in ENCODERS.items():
        if type(level.encoder) is cls:
            return name
    raise FmktError("the FPN flow's encoder is not a registered encoder, so an artifact cannot rebuild it; build "
                    "the flow with encoder=<one of the registered names>.")


def detector_spec(detector: str, num_classes: int, *, min_size: int, max_size: int, flow=None,
                  default_steps: int | None = None, options: dict | None = None,
                  trainable_backbone_layers: int | None = None) -> dict:
    """The spec of a detector (``flow``: an FPNFlow, its spec dict, or None); ``default_steps`` defaults to the
    flow's eval steps (0 without a flow); ``trainable_backbone_layers``: set for a student started from an ImageNet
    classifier file (its body's BatchNorm frozen, the stages before the last n not trained), None from scratch."""
    fspec = flow if flow is None or isinstance(flow, dict) else flow_spec(flow)
    if default_steps is None:
        default_steps = int(fspec.get("eval_steps") or 1) if fspec else 0
    spec = {"task": TASK, "detector": detector, "num_classes": num_classes, "min_size": min_size,
            "max_size": max_size, "options": dict(options or {}), "flow": fspec, "default_steps": default_steps}
    if trainable_backbone_layers is not None:
        spec.update(frozen_backbone_bn=True, trainable_backbone_layers=trainable_backbone_layers)
    return check_spec(spec)


def check_spec(spec, where: str = "the detection spec") -> dict:
    """``spec`` if it describes a detector this module can rebuild, else one FmktError sentence naming the key."""
    if not isinstance(spec, dict):
        raise FmktError(f"{where} must be a dict with {', '.join(SPEC_KEYS)}, got {type(spec).__name__}.")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing or spec["task"] != TASK:
        why = f"lacks {', '.join(missing)}" if missing else f"has task {spec['task']!r}, not {TASK!r}"
        raise FmktError(f"{where} {why}; expected {', '.join(SPEC_KEYS)} with task {TASK!r}.")
    ints = {k: spec[k] for k in ("num_classes", "min_size", "max_size", "default_steps")}
    bad = [k for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad or not isinstance(spec["detector"], str) or not isinstance(spec.get("options", {}), dict):
        what = f"{bad[0]} = {ints[bad[0]]!r}" if bad else "detector/options"
        raise FmktError(f"{where} has a bad {what}: expected a detector name, integer sizes, num_classes and "
                        "default_steps >= 0, and options as a dict.")
    _check_backbone_keys(spec, where)
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as exc:
        raise FmktError(f"{where} must be JSON (fmkt.json holds it): {exc}.") from None
    flow = spec["flow"]
    if flow is None:
        if spec["default_steps"] != 0:
            raise FmktError(f"{where} has no flow but default_steps {spec['default_steps']}; a detector without an "
                            "FPN flow runs 0 steps.")
        return spec
    lacking = [k for k in FLOW_KEYS if k not in flow] if isinstance(flow, dict) else list(FLOW_KEYS)
    if lacking:
        raise FmktError(f"{where}'s flow lacks {', '.join(lacking)}; write it with flow_spec(flow).")
    if spec["default_steps"] < 1:
        raise FmktError(f"{where} has an FPN flow, so default_steps must be >= 1 (the Euler steps run at "
                        f"inference), got {spec['default_steps']}.")
    return spec


def _check_backbone_keys(spec: dict, where: str) -> None:
    given = [k for k in BACKBONE_KEYS if k in spec]
    if not given:
        return
    n = spec.get("trainable_backbone_layers")
    if len(given) < 2 or spec["frozen_backbone_bn"] is not True or isinstance(n, bool) or not isinstance(n, int) \
            or n < 0:
        raise FmktError(f"{where} has a bad {' / '.join(given)}: a student started from an ImageNet classifier "
                        "file records frozen_backbone_bn true and trainable_backbone_layers >= 0, a student from "
                        "scratch neither.")


def build_detector(spec: dict, steps: int | None = None) -> nn.Module:
    """The module ``spec`` describes (random weights): the detector (its backbone body's BatchNorm frozen and its
    first stages not trainable when the spec says so), with its FPN flow attached at K = ``steps`` (default
    ``default_steps``) when it has one."""
    from fmkt.detection.backbone import freeze_backbone
    from fmkt.detection.fpn_flow import FPNFlow, attach_flow
    from fmkt.detection.models import create_detector, fpn_channels

    spec = check_spec(spec)
    detector = create_detector(spec["detector"], spec["num_classes"], min_size=spec["min_size"],
                               max_size=spec["max_size"], **spec.get("options", {}))
    if spec.get("frozen_backbone_bn"):
        freeze_backbone(detector, spec["trainable_backbone_layers"])
    f = spec["flow"]
    if f is None:
        return detector
    extra = {k: (tuple(f[k]) if isinstance(f[k], list) else f[k]) for k in FLOW_OPTIONAL if f.get(k) is not None}
    flow = FPNFlow(f["levels"], fpn_channels(detector), f["weights"], encoder=f["encoder"], schedule=f["schedule"],
                   project_teacher=bool(f["project_teacher"]), **extra)
    return attach_flow(detector, flow, spec["default_steps"] if steps is None else steps)


def refined_steps(model: nn.Module) -> int:
    """K of a deployable detector: its RefinedBackbone's steps, 0 without a flow."""
    from fmkt.detection.fpn_flow import RefinedBackbone

    backbone = getattr(model, "backbone", None)
    return backbone.steps if isinstance(backbone, RefinedBackbone) else 0


def _check_fits(model: nn.Module, spec: dict) -> None:
    """One sentence when ``model`` is not the module ``spec`` rebuilds (keys, shapes, K)."""
    try:
        with torch.device("meta"):  # shapes only: nothing allocated
            rebuilt = build_detector(spec)
    except (RuntimeError, NotImplementedError):  # a factory that needs real tensors to build
        rebuilt = build_detector(spec)
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        odd = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise FmktError(f"the detector does not fit its spec ({len(odd)} keys differ, first {odd[0]!r}); describe "
                        "the model that is saved (detector_spec: name, num_classes, options, flow).")
    if refined_steps(model) != spec["default_steps"]:
        raise FmktError(f"the detector runs {refined_steps(model)} flow steps but the spec says default_steps "
                        f"{spec['default_steps']}; attach the flow with the steps the spec records.")


def save_detector_artifact(path: str | Path, model: nn.Module, spec: dict, record: dict) -> Path:
    """Write the detection artifact folder atomically (``fmkt.artifact.save_artifact``): the deployable student's
    weights and fmkt.json (``spec`` under "model", ``record``'s keys, the weights' sha256). Returns the folder."""
    _check_fits(model, check_spec(spec))
    clash = sorted(set(record) & {"format", "format_version", "fmkt_version", "created", "model", "weights_sha256"})
    if clash:
        raise FmktError(f"the run record may not set {', '.join(clash)}: fmkt.json's writer sets them.")
    return save_artifact(path, model, spec, record)


def load_detector_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(the deployable detector in eval mode, fmkt.json): rebuilt from the spec, the weights' sha256 verified,
    loaded strictly."""
    path = Path(path)
    meta = read_meta(path)
    check_spec(meta["model"], f"{path / META}'s model")
    state = read_weights(path, meta, map_location)
    model = build_detector(meta["model"]).to(map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FmktError(f"{path / WEIGHTS} does not fit the detector in {META} "
                        f"({first_line(exc, None, with_type=False)}).") from None
    return model.eval(), meta


def is_detector_artifact(path: str | Path) -> bool:
    """Whether ``path`` is an artifact folder whose fmkt.json describes a detector (no weights are read)."""
    try:
        meta = read_meta(path)
    except FmktError:
        return False
    return isinstance(meta["model"], dict) and meta["model"].get("task") == TASK


def at_steps(model: nn.Module, steps: int) -> nn.Module:
    """The deployable detector with K = ``steps`` refinement steps (0: the plain detector, its FPN maps as they
    are), sharing every module and parameter with ``model``; one sentence for K >= 1 on a detector with no flow."""
    import copy
    from collections import OrderedDict

    from fmkt.detection.fpn_flow import RefinedBackbone, attach_flow

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise FmktError(f"--steps must be an integer >= 0, got {steps!r}.")
    backbone = model.backbone
    if not isinstance(backbone, RefinedBackbone):
        if steps:
            raise FmktError("this detector has no FPN flow (method none or pkd): there are no steps to run; use "
                            "--steps 0.")
        return model
    plain = copy.copy(model)
    plain._modules = OrderedDict(model._modules)
    plain.backbone = backbone.raw
    return plain if steps == 0 else attach_flow(plain, backbone.flow, steps)
