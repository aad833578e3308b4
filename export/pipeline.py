"""``fmkt-cli export``: artifact -> static graph (a format of ``formats.EXPORT_FORMATS``) + export.json +
parity.json, atomically.

Output folder (default ``<artifact>/../export-<format>-k<K>[-fp16]``):
- the format's files (``EXPORT_FORMATS[fmt].files``, written by its ``write_export(job)``);
- always ``export.json`` (the metadata, also inside the ONNX's ``metadata_props``) and ``parity.json``.
The folder is built under a temporary name and renamed into place; an existing one needs ``force``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fmkt import __version__
from fmkt.artifact import load_artifact
from fmkt.runtime import resolve_device
from fmkt.errors import FmktError
from fmkt.files import atomic_dir
from fmkt.export.formats import EXPORT_FORMATS, PRECISIONS
from fmkt.export.graph import check_steps, static_module
from fmkt.export.parity import ParityError, check_parity, parity_images

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


@dataclass
class ExportJob:
    """What a format's ``write_export`` gets: the folder being written and what goes into it."""
    artifact: str | Path
    tmp: Path  # the folder being written (renamed to ``out`` at the end)
    out: Path  # where it will be (a TensorRT timing cache from an earlier export there is reused)
    module: torch.nn.Module  # the static graph with K fixed
    steps: int
    images: torch.Tensor  # the parity batch (raw images in [0, 1])
    batches: list  # the batch sizes parity checks
    bounds: tuple  # (min, opt, max) batch
    precision: str
    opset: int | None  # None unless the format takes --opset
    device: torch.device  # --device for a format compiled on_device, else the CPU
    meta: dict  # export.json (its ONNX metadata too), filled in as the format writes
    parity: Callable  # parity(runner, target) -> ParityReport against parity.GATES[precision]
    files: dict = field(default_factory=dict)  # export.json "files": key -> file name in the folder
    engine_error: FmktError | None = None  # a second stage that could not run here (trt without TensorRT)


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


def _check_request(fmt: str, precision: str, steps, batch, opset, device: str):
    """The options, checked before anything is loaded: ((min, opt, max) batch, opset, device)."""
    from fmkt.export import onnx_export as ox

    entry = EXPORT_FORMATS.get(fmt)
    if entry is None:
        raise FmktError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if precision not in PRECISIONS:
        raise FmktError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise FmktError(f"--steps must be an integer >= 0, got {steps!r}.")
    bounds = parse_batch(batch) if isinstance(batch, str) else parse_batch(":".join(map(str, batch)))
    if not entry.opset and opset is not None:
        takes = " and ".join(name for name, f in EXPORT_FORMATS.items() if f.opset)
        raise FmktError(f"--opset only applies to the {takes} formats.")
    opset = ox.DEFAULT_OPSET if opset is None and entry.opset else opset
    dev = resolve_device(device) if entry.on_device else torch.device("cpu")
    refusal = entry.refused(dev)
    if refusal:
        raise FmktError(f"{refusal}.")
    for module in entry.needs:
        ox.require(module)
    return bounds, opset, dev


def _output_folder(out, artifact, fmt: str, steps: int, precision: str, force: bool) -> Path:
    out = Path(out) if out is not None else default_out(artifact, fmt, steps, precision)
    if out.exists() and not force:
        raise FmktError(f"{out} already exists; pass --force to overwrite it.")
    if out.exists() and not out.is_dir():
        raise FmktError(f"output path {out} exists and is a file; pass a folder path with --out.")
    return out


def run_export(artifact: str | Path, steps: int | None, fmt: str = "onnx", *, precision: str = "fp32",
               batch: str | tuple = DEFAULT_BATCH, opset: int | None = None, out: str | Path | None = None,
               force: bool = False, device: str = "auto") -> ExportResult:
    """Export ``artifact`` with K = ``steps`` to ``fmt``; write the folder; return the files and the parity report.

    A detection artifact (``fmkt.detection.artifact``) goes through its format's detection writer
    (``export/detection.py``; ``steps`` None: the artifact's default K). Raises FmktError for user errors before
    anything is written. A parity breach or a missing TensorRT does not raise here (the files are written first):
    call ``result.raise_for_status()``.
    """
    from fmkt.detection.artifact import is_detector_artifact

    bounds, opset, dev = _check_request(fmt, precision, 0 if steps is None else steps, batch, opset, device)
    if is_detector_artifact(artifact):
        from fmkt.artifact import read_meta
        from fmkt.export import detection

        detection.check_request(fmt, precision, bounds, parse_batch(DEFAULT_BATCH))
        steps = detection.resolve_steps(read_meta(artifact), steps)
        out = _output_folder(out, artifact, fmt, steps, precision, force)
        parts = detection.prepare(artifact, steps, fmt, opset)
    else:
        if steps is None:
            raise FmktError("--steps is required for a classification artifact: the K flow steps to unroll (0: the "
                            "FM-KT^Theta head or a plain student).")
        out, parts = _classification(artifact, steps, fmt, precision, bounds, out, force, opset)
    return _write_folder(artifact, out, force, steps, precision, opset, dev, parts)


def _classification(artifact, steps: int, fmt: str, precision: str, bounds: tuple, out, force: bool, opset) -> tuple:
    """(the output folder, what ``_write_folder`` writes) for a classification artifact."""
    model, meta = load_artifact(artifact)
    check_steps(model, steps, meta.get("method"))
    out = _output_folder(out, artifact, fmt, steps, precision, force)
    module = static_module(model, steps, meta.get("method"))
    export_meta = export_metadata(meta, model, steps, fmt, precision, bounds, opset)
    export_meta["source"]["artifact"] = str(Path(artifact).resolve())
    images, data = parity_images(meta, min(PARITY_BATCH, bounds[2]))
    reference = lambda x: model(x, steps=steps if model.is_flow else None)  # noqa: E731
    batches = [bounds[0], len(images)]
    parity = lambda runner, target: check_parity(reference, runner, images, batches, precision, target, data)  # noqa: E731
    return out, dict(module=module, meta=export_meta, images=images, batches=batches, bounds=bounds, parity=parity,
                     write=EXPORT_FORMATS[fmt].writer())


def _write_folder(artifact, out: Path, force: bool, steps: int, precision: str, opset, dev,
                  parts: dict) -> ExportResult:
    """The format's files, export.json and parity.json, written atomically into ``out``."""
    export_meta = parts["meta"]
    with atomic_dir(out, overwrite=force) as tmp:
        job = ExportJob(artifact, tmp, out, parts["module"], steps, parts["images"], parts["batches"],
                        parts["bounds"], precision, opset, dev, export_meta, parts["parity"])
        reports = parts["write"](job)
        passed = all(r.passed for r in reports)
        export_meta["parity"] = {"passed": passed, "file": "parity.json", "targets": [r.target for r in reports]}
        export_meta["files"] = {**job.files, "metadata": "export.json", "parity": "parity.json"}
        (tmp / "export.json").write_text(json.dumps(export_meta, indent=2) + "\n")
        parity_json = {"passed": passed, "reports": [r.to_dict() for r in reports]}
        (tmp / "parity.json").write_text(json.dumps(parity_json, indent=2) + "\n")
    return ExportResult(out=out, files=export_meta["files"], meta=export_meta, reports=reports,
                        engine_error=job.engine_error)
