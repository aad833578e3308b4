"""``fmkt-cli export`` of a detection artifact (issue 23): the student detector with its K flow steps unrolled, as
ONNX through torchvision's own detection export path, with parity on boxes, scores and labels.

torchvision exports its detectors with the TorchScript tracer (``dynamo=False``; its test_onnx.py exports Faster
R-CNN on a list of ONE image, opset >= 11): the transform (resize, normalisation), the RPN's proposal filtering and
the RoI heads' post-processing loop over the images in Python, so the traced graph has the number of images baked
in. The batch is therefore fixed at 1 (no dynamic batch: torchvision does not allow one); the number of detections
is the one dynamic dimension. The input is one raw image (1, 3, S, S) in [0, 1] at the artifact's input side S (the
square evaluation resize; the detector's own resize and normalisation run inside the graph); the outputs are
``boxes`` (n, 4) xyxy in input pixels, ``scores`` (n,) and ``labels`` (n,) int64 (1..C). The K Euler steps of the
FPN flow are unrolled by tracing (each weighted level's meta-encoder K times, the schedule's constants baked in);
K = 0 is the plain detector. Only the ``onnx`` format has a detection writer (``ExportFormat.detection``), fp32 only.

TensorRT readiness: the op list with the oldest TensorRT whose parser reads each op (``onnx_export.trt_ops``), and
the problems of ``onnx_export.op_problems`` (ops, domains, opset, constant inputs); control flow (torchvision's
batched_nms is scripted under tracing: an If whose else branch holds the NonMaxSuppression; subgraph ops are
counted) and the data-dependent shapes of NMS / NonZero are listed, not counted as
problems: TensorRT's parser reads If, NonZero and NonMaxSuppression (data-dependent shapes since TensorRT 8.5).
"""
from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fmkt import __version__
from fmkt.errors import FmktError
from fmkt.export import onnx_export as ox

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")
NORMALISATION = ("inside the graph: the detector's own transform (resize to min_size/max_size, (x - mean) / std); "
                 "pass one raw image in [0, 1], resized to the input side as evaluation does")


class DetectorGraph(nn.Module):
    """Raw images (B, 3, H, W) in [0, 1] -> (boxes, scores, labels): image 0's when B = 1 (the exported graph),
    else every image's concatenated (eager timing)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector.eval()

    def forward(self, images: torch.Tensor):
        outs = self.detector(list(images.unbind(0)))
        if len(outs) == 1:
            return outs[0]["boxes"], outs[0]["scores"], outs[0]["labels"]
        return tuple(torch.cat([o[k] for o in outs]) for k in OUTPUT_NAMES)


def input_side(meta: dict) -> int:
    """S, the side of the square image the graph takes: the spec's or the dataset's ``image_size``, else min_size."""
    spec, dataset = meta["model"], meta.get("dataset") or {}
    side = spec.get("image_size") or (dataset.get("image_size") if isinstance(dataset, dict) else None)
    side = side[0] if isinstance(side, (list, tuple)) else side
    return int(side or spec["min_size"])


def resolve_steps(meta: dict, steps: int | None) -> int:
    """K: ``steps`` or the artifact's default; one sentence when the detector cannot run it."""
    spec = meta["model"]
    k = spec["default_steps"] if steps is None else steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise FmktError(f"--steps must be an integer >= 0, got {k!r}.")
    if k and spec.get("flow") is None:
        raise FmktError(f"this detection artifact (method {meta.get('method') or 'unknown'}) has no FPN flow, so "
                        "there are no steps to unroll; export it with --steps 0 (or without --steps).")
    return k


def check_request(fmt: str, precision: str, bounds: tuple, default_bounds: tuple) -> None:
    from fmkt.export.formats import EXPORT_FORMATS

    if EXPORT_FORMATS[fmt].detection is None:
        takes = " and ".join(n for n, f in EXPORT_FORMATS.items() if f.detection is not None)
        raise FmktError(f"the {fmt} format does not take detection artifacts yet; use --format {takes}.")
    if precision != "fp32":
        raise FmktError("detection exports are fp32 only (NMS and RoIAlign run on the boxes in float32); drop "
                        "--precision fp16.")
    if bounds not in (default_bounds, (1, 1, 1)):
        raise FmktError("a detection graph takes one image per call (torchvision traces its per-image loops, so the "
                        "batch is fixed at 1); drop --batch.")


def detection_onnx(module: nn.Module, example: torch.Tensor, opset: int = ox.DEFAULT_OPSET):
    """Trace ``module`` (a DetectorGraph) on one image -> the checked, folded onnx.ModelProto."""
    onnx = ox.require("onnx")
    if not ox.OPSET_RANGE[0] <= opset <= ox.OPSET_RANGE[1]:
        raise FmktError(f"--opset {opset} is outside the supported range {ox.OPSET_RANGE[0]}-{ox.OPSET_RANGE[1]}.")
    buf = io.BytesIO()
    dynamic = {name: {0: "detections"} for name in OUTPUT_NAMES}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's shape arithmetic
        torch.onnx.export(module, (example[:1],), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)
    return ox.cleanup(onnx.load_from_string(buf.getvalue()))


def readiness(graph) -> dict:
    """export.json's ``tensorrt_readiness`` for a detection graph (see the module docstring)."""
    from fmkt.export.trt_operators import ADDED_SOURCE, SOURCE

    ops = ox.trt_ops(graph)
    problems = ox.op_problems(graph, allow_control_flow=True)
    dynamic = sorted(vi.name for vi in [*graph.graph.value_info, *graph.graph.output]
                     if any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim))
    return {"ready": not problems, "min_tensorrt": ox.min_tensorrt(graph), "ops": ops,
            "unsupported_ops": sorted(op for op, v in ops.items() if v["tensorrt"] is None), "problems": problems,
            "control_flow": ox.graph_summary(graph)["control_flow"], "data_dependent_tensors": len(dynamic),
            "note": "the number of proposals and detections is data-dependent (NonZero, NonMaxSuppression): "
                    "TensorRT reads such shapes since 8.5; the If nodes are torchvision's batched_nms, scripted "
                    "under tracing (no boxes: nothing to suppress; else NonMaxSuppression in the else branch, "
                    "counted in ops), and TensorRT's parser reads If. No engine was built here.",
            "operator_list": SOURCE, "added_operators": ADDED_SOURCE}


def metadata(meta: dict, steps: int, fmt: str, opset: int | None, side: int) -> dict:
    """export.json: the classification export's top-level keys where they apply, plus ``task`` and ``detector``."""
    spec, dataset = meta["model"], meta.get("dataset") or {}
    flow = spec.get("flow") or {}
    graph = f"detector, K={steps} flow steps unrolled on the FPN" if steps else "plain student (no flow)"
    detections = ["detections"]
    return {
        "format": "fmkt-export", "fmkt_version": __version__, "target": fmt, "task": "detection", "graph": graph,
        "steps": steps, "schedule": flow.get("schedule") if steps else None, "encoder": flow.get("encoder"),
        "transfer": "feature" if steps else None, "method": meta.get("method"), "arch": spec["detector"],
        "num_classes": spec["num_classes"], "class_names": dataset.get("class_names"), "precision": "fp32",
        "tf32": False,
        "input": {"name": INPUT_NAME, "shape": [1, 3, side, side], "dtype": "float32", "range": [0.0, 1.0],
                  "normalisation": NORMALISATION},
        "output": {"boxes": {"shape": [*detections, 4], "dtype": "float32", "format": "xyxy, input pixels"},
                   "scores": {"shape": detections, "dtype": "float32"},
                   "labels": {"shape": detections, "dtype": "int64", "range": [1, spec["num_classes"] - 1]}},
        "batch": {"min": 1, "opt": 1, "max": 1, "why": "torchvision traces its per-image loops: fixed at 1"},
        "detector": {k: spec[k] for k in ("min_size", "max_size")} | {"options": spec.get("options") or {},
                                                                      "flow_levels": flow.get("levels")},
        "opset": opset,
        "source": {"weights_sha256": meta.get("weights_sha256"), "fmkt_version": meta.get("fmkt_version"),
                   "dataset": dataset.get("name")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare(artifact: str | Path, steps: int, fmt: str, opset: int | None) -> dict:
    """What ``pipeline.run_export`` writes for a detection artifact at K = ``steps``: the module, export.json's
    start, the parity images and check, the format's detection writer."""
    from fmkt.detection.artifact import at_steps, load_detector_artifact
    from fmkt.export.detection_parity import check_detection_parity, parity_images
    from fmkt.export.formats import EXPORT_FORMATS, resolve

    model, meta = load_detector_artifact(artifact)
    module = DetectorGraph(at_steps(model, steps)).eval()
    side = input_side(meta)
    export_meta = metadata(meta, steps, fmt, opset, side)
    export_meta["source"]["artifact"] = str(Path(artifact).resolve())
    images, data = parity_images(meta, side)

    def parity(runner, target):
        return check_detection_parity(module, runner, images, "fp32", target, data)
    return dict(module=module, meta=export_meta, images=images, batches=[1], bounds=(1, 1, 1), parity=parity,
                write=resolve(EXPORT_FORMATS[fmt].detection))


def ort_detect(session, images: torch.Tensor) -> tuple:
    """(boxes, scores, labels) of the exported graph on one image (1, 3, S, S)."""
    outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.detach().cpu().float().numpy()})
    return tuple(torch.from_numpy(o) for o in outs)


def write_export(job) -> list:
    """The onnx format's detection writer (``EXPORT_FORMATS["onnx"].detection``): model.onnx with the export
    metadata and TensorRT readiness inside, and its parity in ONNX Runtime."""
    graph = detection_onnx(job.module, job.images[:1], job.opset)
    job.meta["graph_summary"] = ox.graph_summary(graph)
    job.meta["tensorrt_readiness"] = readiness(graph)
    ox.set_metadata(graph, job.meta)
    graph.doc_string = "fmkt detector: one raw image (1, 3, S, S) in [0, 1] -> boxes, scores, labels"
    data = graph.SerializeToString()
    (job.tmp / "model.onnx").write_bytes(data)
    job.files["onnx"] = "model.onnx"
    session = ox.ort_session(data, job.precision)
    return [job.parity(lambda x: ort_detect(session, x), f"onnxruntime {session.get_providers()[0]}")]
