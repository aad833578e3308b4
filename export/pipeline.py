"""``fmkt-cli export``: artifact -> static graph (onnx | trt | aoti) + export.json + parity.json, atomically.

Output folder (default ``<artifact>/../export-<format>-k<K>[-fp16]``):
- onnx: ``model.onnx``; trt: ``model.onnx`` + ``model.plan`` + ``timing.cache``; aoti: ``model.pt2``;
- always ``export.json`` (the metadata, also inside the ONNX's ``metadata_props``) and ``parity.json``.
The folder is built under a temporary name and renamed into place; an existing one needs ``force``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fmkt import __version__
from fmkt.artifact import load_artifact
from fmkt.runtime import resolve_device
from fmkt.errors import FmktError
from fmkt.files import atomic_dir
from fmkt.export.graph import check_steps, static_module
from fmkt.export.parity import ParityError, check_parity, parity_images

FORMATS = ("onnx", "trt", "aoti")
PRECISIONS = ("fp32", "fp16")
DEFAULT_BATCH = "1:32:128"
PARITY_BATCH = 64  # images in the parity batch (capped by the profile's max batch)
NORMALISATION = "folded into the graph: pass raw images in [0, 1], (x - mean) / std runs inside"


@dataclass
class ExportResult:
    out: Path
    files: dict
    meta: dict
    reports: list  # ParityReport per runtime checked (ONNX Runtime, then the TensorRT engine when built)
    engine_error: FmktError | None = None  # trt without TensorRT or a GPU: the ONNX was still written

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)

    def raise_for_status(self) -> None:
        """ParityError when the gate was breached, else TensorRTUnavailable when no engine could be built."""
        for report in self.reports:
            if not report.passed:
                raise ParityError(f"{report.breach()}; the files were kept in {self.out} for inspection.")
        if self.engine_error is not None:
            raise self.engine_error


def parse_batch(text: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or one number N = N:N:N) -> (min, opt, max) with 1 <= min <= opt <= max."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise FmktError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}.")
    return parts[0], parts[1], parts[2]


def default_out(artifact: str | Path, fmt: str, steps: int, precision: str) -> Path:
    suffix = "-fp16" if precision == "fp16" else ""
    return Path(artifact).resolve().parent / f"export-{fmt}-k{steps}{suffix}"


def export_metadata(meta: dict, model, steps: int, fmt: str, precision: str, batch: tuple, opset: int | None) -> dict:
    """What export.json and the ONNX metadata_props say about the graph."""
    spec = meta["model"]
    inp = spec["input"]
    kind = ("flow, K steps unrolled" if model.is_flow and steps >= 1 else
            "FM-KT^Theta head (no encoder)" if model.is_flow else "plain student (no flow)")
    return {
        "format": "fmkt-export",
        "fmkt_version": __version__,
        "target": fmt,
        "graph": kind,
        "steps": steps,
        "schedule": spec.get("schedule") if model.is_flow else None,
        "encoder": spec.get("encoder"),
        "transfer": spec.get("transfer") if model.is_flow else None,
        "method": meta.get("method"),
        "arch": spec.get("arch"),
        "num_classes": spec["num_classes"],
        "class_names": (meta.get("dataset") or {}).get("class_names"),
        "precision": precision,
        "tf32": precision != "fp32",  # fp32 is IEEE fp32: TF32 off in TensorRT, ONNX Runtime CUDA and AOTI/cuDNN
        "input": {"name": "images", "shape": ["batch", inp["channels"], *inp["size"]], "dtype": "float32",
                  "range": inp.get("range", [0.0, 1.0]), "mean": inp["mean"], "std": inp["std"],
                  "normalisation": NORMALISATION},
        "output": {"name": "logits", "shape": ["batch", spec["num_classes"]], "dtype": "float32"},
        "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "opset": opset,
        "source": {"weights_sha256": meta.get("weights_sha256"), "fmkt_version": meta.get("fmkt_version"),
                   "dataset": (meta.get("dataset") or {}).get("name")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def compile_aoti(artifact, steps: int, package: Path, batch: tuple, precision: str, device: torch.device,
                 images: torch.Tensor, batches: list[int]):
    """Compile the K-step graph into ``package`` and run it on the parity batches, all in a child process;
    returns a runner replaying the child's logits. A child that crashes is one sentence (FmktError)."""
    from fmkt.export.aoti import ChildCrashed, run_in_child

    sizes = sorted(set(min(b, len(images)) for b in batches))
    try:
        outputs = run_in_child("validate", artifact=artifact, graph=str(steps), package=package, batch=batch,
                               precision=precision, device=device, shape=tuple(images.shape[1:]), images=images,
                               batches=sizes)
    except ChildCrashed as exc:
        raise FmktError(f"{exc}; nothing was written: torch {torch.__version__} cannot compile or run this AOTI "
                        f"package on {device.type} here, so use --format onnx or trt (or --device cpu for AOTI)."
                        ) from None
    return lambda x: outputs[len(x)]


def _check_request(fmt: str, precision: str, steps, batch, opset, device: str):
    """The options, checked before anything is loaded: ((min, opt, max) batch, opset, device)."""
    from fmkt.export import onnx_export as ox

    if fmt not in FORMATS:
        raise FmktError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if precision not in PRECISIONS:
        raise FmktError(f"unknown precision {precision!r}; choose fp32 or fp16.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise FmktError(f"--steps must be an integer >= 0, got {steps!r}.")
    bounds = parse_batch(batch) if isinstance(batch, str) else parse_batch(":".join(map(str, batch)))
    if fmt == "aoti" and opset is not None:
        raise FmktError("--opset only applies to the onnx and trt formats.")
    opset = ox.DEFAULT_OPSET if opset is None and fmt != "aoti" else opset
    dev = resolve_device(device) if fmt == "aoti" else torch.device("cpu")
    if fmt == "aoti":
        from fmkt.export.aoti import cuda_refusal

        refusal = cuda_refusal(dev)
        if refusal:
            raise FmktError(f"{refusal}.")
    else:
        ox.require("onnx"), ox.require("onnxruntime")
    return bounds, opset, dev


def _output_folder(out, artifact, fmt: str, steps: int, precision: str, force: bool) -> Path:
    out = Path(out) if out is not None else default_out(artifact, fmt, steps, precision)
    if out.exists() and not force:
        raise FmktError(f"{out} already exists; pass --force to overwrite it.")
    if out.exists() and not out.is_dir():
        raise FmktError(f"output path {out} exists and is a file; pass a folder path with --out.")
    return out


def _write_onnx(tmp: Path, module, example, opset: int, precision: str, export_meta: dict):
    """model.onnx (checked, FP16 if asked, metadata inside); returns (runner, target) for the parity check."""
    from fmkt.export import onnx_export as ox

    graph = ox.cleanup(ox.export_onnx(module, example, opset))
    if precision == "fp16":
        graph = ox.to_fp16(graph)
    export_meta["graph_summary"] = ox.graph_summary(graph)
    export_meta["tensorrt_readiness"] = ox.readiness_report(graph)
    ox.set_metadata(graph, export_meta)
    (tmp / "model.onnx").write_bytes(graph.SerializeToString())
    session = ox.ort_session(graph.SerializeToString(), precision)
    return (lambda x: ox.ort_run(session, x)), f"onnxruntime {session.get_providers()[0]}"


def _write_engine(tmp: Path, out: Path, images, bounds: tuple, precision: str, export_meta: dict, parity) -> tuple:
    """model.plan + timing.cache from model.onnx and the engine's parity report; (report, None), or (None, the
    reason) when TensorRT or a GPU is missing (the ONNX is kept)."""
    from fmkt.export.tensorrt_engine import EngineRunner, TensorRTUnavailable, build_engine, load_tensorrt

    try:
        load_tensorrt(out / "model.onnx")  # one sentence and exit 2 when TensorRT or a GPU is missing
        export_meta["tensorrt"] = build_engine(tmp / "model.onnx", tmp / "model.plan", tmp / "timing.cache",
                                               tuple(images.shape[1:]), bounds, precision,
                                               reuse_cache=out / "timing.cache")
    except TensorRTUnavailable as exc:
        export_meta["tensorrt"] = {"built": False, "reason": str(exc)}
        return None, exc
    return parity(EngineRunner(tmp / "model.plan"), f"TensorRT {export_meta['tensorrt']['tensorrt']}"), None


def run_export(artifact: str | Path, steps: int, fmt: str = "onnx", *, precision: str = "fp32",
               batch: str | tuple = DEFAULT_BATCH, opset: int | None = None, out: str | Path | None = None,
               force: bool = False, device: str = "auto") -> ExportResult:
    """Export ``artifact`` with K = ``steps`` to ``fmt``; write the folder; return the files and the parity report.

    Raises FmktError for user errors before anything is written. A parity breach or a missing TensorRT does not
    raise here (the files are written first): call ``result.raise_for_status()``.
    """
    bounds, opset, dev = _check_request(fmt, precision, steps, batch, opset, device)
    model, meta = load_artifact(artifact)
    check_steps(model, steps, meta.get("method"))
    out = _output_folder(out, artifact, fmt, steps, precision, force)
    module = static_module(model, steps, meta.get("method"))
    export_meta = export_metadata(meta, model, steps, fmt, precision, bounds, opset if fmt != "aoti" else None)
    export_meta["source"]["artifact"] = str(Path(artifact).resolve())
    images, data = parity_images(meta, min(PARITY_BATCH, bounds[2]))
    reference = lambda x: model(x, steps=steps if model.is_flow else None)  # noqa: E731
    batches = [bounds[0], len(images)]
    parity = lambda runner, target: check_parity(reference, runner, images, batches, precision, target, data)  # noqa: E731
    files, engine_error = {}, None
    with atomic_dir(out, overwrite=force) as tmp:
        if fmt in ("onnx", "trt"):
            example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)  # trace with B >= 2
            reports = [parity(*_write_onnx(tmp, module, example, opset, precision, export_meta))]
            files["onnx"] = "model.onnx"
        else:
            runner = compile_aoti(artifact, steps, tmp / "model.pt2", bounds, precision, dev, images, batches)
            export_meta["aoti"] = {"torch": torch.__version__, "device": str(dev), "tf32": precision != "fp32",
                                   "compiled_in": "a child process (a crash there cannot take this process down)"}
            files["aoti"] = "model.pt2"
            reports = [parity(runner, f"AOTInductor ({dev.type})")]
        if fmt == "trt" and reports[0].passed:
            report, engine_error = _write_engine(tmp, out, images, bounds, precision, export_meta, parity)
            if report is not None:
                files.update(engine="model.plan", timing_cache="timing.cache")
                reports.append(report)
        passed = all(r.passed for r in reports)
        export_meta["parity"] = {"passed": passed, "file": "parity.json", "targets": [r.target for r in reports]}
        export_meta["files"] = {**files, "metadata": "export.json", "parity": "parity.json"}
        (tmp / "export.json").write_text(json.dumps(export_meta, indent=2) + "\n")
        parity_json = {"passed": passed, "reports": [r.to_dict() for r in reports]}
        (tmp / "parity.json").write_text(json.dumps(parity_json, indent=2) + "\n")
    return ExportResult(out=out, files=export_meta["files"], meta=export_meta, reports=reports,
                        engine_error=engine_error)
