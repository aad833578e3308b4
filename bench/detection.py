"""``fmkt-cli bench`` on a detection artifact (issue 23): the student detector at K refinement steps, without them
(K = 0, the variant ``student``: the detector alone, its FPN maps as they are) and, with ``--teacher``, the teacher
detector, per backend, with the rows and files classification writes.

Every variant takes one raw image batch (B, 3, S, S) in [0, 1] (S: the artifact's input side) and runs the whole
detector (its resize and normalisation, backbone, FPN, flow, RPN, RoI heads, NMS); eager returns the detections
packed as one (n, 6) tensor (boxes, score, label) so a CUDA run copies them back like logits. ``onnxruntime`` runs
the export's graph (the export folder's own ``model.onnx``, or exported here as ``fmkt-cli export`` does): one image
per call, so its rows at another batch are unavailable, with the reason. The teacher (``--teacher``) is a detection
artifact folder, or a weights file of the architecture the artifact records (``teacher.arch``), built at the
student's classes, sizes and options. The ``top1`` column stays empty: a detector has no top-1; its COCO AP per K is
in the artifact's metrics (and in the JSON's model summary when recorded).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from fmkt.errors import FmktError

from .plan import DEFAULT_BATCHES, Source, Unavailable
from .runners import OrtRunner

ONE_IMAGE = "the detection graph takes one image per call (torchvision traces its per-image loops): batch 1 only"
STUDENT_NOTE = "detection: 'student' is the detector without its FPN flow (K=0, no refinement)"


class PackedDetections(nn.Module):
    """A DetectorGraph whose (boxes, scores, labels) come back as one (n, 6) float tensor."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        boxes, scores, labels = self.graph(images)
        return torch.cat([boxes, scores[:, None], labels[:, None].to(boxes.dtype)], 1)


def load_detection_source(path: Path) -> Source:
    from fmkt.detection.artifact import load_detector_artifact

    model, meta = load_detector_artifact(path)
    return Source(path, model, meta, artifact=path, task="detection")


def load_teacher(source: Source, teacher: str | Path) -> nn.Module:
    """The teacher detector ``--teacher`` names (see the module docstring), in eval mode."""
    from fmkt.detection.artifact import is_detector_artifact, load_detector_artifact
    from fmkt.detection.models import create_detector

    if source.task != "detection" or source.meta is None:
        raise FmktError("--teacher is timed next to a detection artifact (or its export folder with the artifact "
                        "beside it) only.")
    path = Path(teacher)
    if path.is_dir() and is_detector_artifact(path):
        return load_detector_artifact(path)[0]
    if not path.is_file():
        raise FmktError(f"--teacher {path} is neither a detection artifact folder nor a weights file.")
    spec, record = source.meta["model"], source.meta.get("teacher")
    arch = (record.get("arch") or record.get("detector")) if isinstance(record, dict) else None
    if not arch:
        raise FmktError(f"{source.path} records no teacher architecture (teacher.arch) to build {path.name} with; "
                        "pass the teacher as a detection artifact folder.")
    return create_detector(arch, spec["num_classes"], min_size=spec["min_size"], max_size=spec["max_size"],
                           weights=path, **(spec.get("options") or {})).eval()


def adjust_batches(s, notes: list):
    """Detection's default batches: 1 (the exported graph's only batch; eager at 64 images is minutes on a CPU)."""
    import dataclasses

    if list(s.batches) != list(DEFAULT_BATCHES):
        return s
    notes.append("detection: batch 1 (the exported graph's only batch); pass --batch to time eager at others")
    return dataclasses.replace(s, batches=[1])


def detection_variants(source: Source, steps: list[int] | None) -> tuple[list[str], list[str]]:
    """(["student", K...], notes): K from ``steps`` or the artifact's default; K = 0 is the student."""
    spec, notes = source.meta["model"], []
    asked = [spec["default_steps"]] if steps is None else list(steps)
    ks = sorted({k for k in asked if k >= 1})
    if ks and spec.get("flow") is None:
        notes.append(f"a detector without an FPN flow (method {source.meta.get('method')}) has no steps: timing the "
                     "student alone")
        ks = []
    notes.append(STUDENT_NOTE)
    return ["student"] + [str(k) for k in ks], notes


def detector_graph(source: Source, variant: str) -> nn.Module:
    """The variant's DetectorGraph (export/detection.py): the teacher, the student at K = 0 or at K = variant."""
    from fmkt.detection.artifact import at_steps
    from fmkt.export.detection import DetectorGraph

    if variant == "teacher":
        return DetectorGraph(source.teacher).eval()
    return DetectorGraph(at_steps(source.model, 0 if variant == "student" else int(variant))).eval()


def detection_module(source: Source, variant: str) -> nn.Module:
    return PackedDetections(detector_graph(source, variant)).eval()


def detection_onnx_bytes(source: Source, variant: str, example: torch.Tensor) -> bytes:
    from fmkt.export.detection import detection_onnx

    graph = copy.deepcopy(detector_graph(source, variant)).cpu()  # the variant may live on the GPU
    return detection_onnx(graph, example[:1].cpu()).SerializeToString()


class DetectionOrtRunner(OrtRunner):
    """The detection graph in ONNX Runtime on the CPU: one image per call, its three outputs fetched."""

    def prepare(self, x):
        if x.shape[0] != 1:
            raise Unavailable(ONE_IMAGE)
        if self.cuda:
            raise Unavailable("onnxruntime on CUDA is not wired for detection graphs yet (their outputs are "
                              "data-dependent, IOBinding needs their sizes); use --device cpu or eager")
        return x.numpy()

    def run(self, x):
        return self.session.run(None, {"images": x})[0]


def detection_summary(source: Source) -> dict:
    """The JSON's ``model`` for a detection artifact."""
    spec, meta = source.meta["model"], source.meta
    from fmkt.export.detection import input_side

    side = input_side(meta)
    out = {"arch": spec["detector"], "method": meta.get("method"), "task": "detection",
           "encoder": (spec.get("flow") or {}).get("encoder"), "schedule": (spec.get("flow") or {}).get("schedule"),
           "classes": spec["num_classes"], "input": [3, side, side], "default_steps": spec["default_steps"],
           "dataset": (meta.get("dataset") or {}).get("name"), "metrics": meta.get("metrics"),
           "parameters": sum(p.numel() for p in source.model.parameters())}
    if source.teacher is not None:
        out["teacher_parameters"] = sum(p.numel() for p in source.teacher.parameters())
    return out
