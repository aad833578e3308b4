"""EXPORT_FORMATS: the one list of export formats (``fmkt-cli export --format``), and PRECISIONS.

A format is one entry, as a method is one ``METHODS`` entry: what it needs, the files it writes, how it writes them
and which runtimes its parity report holds to the gate (``parity.GATES[precision]``). Functions are named as
``"module:function"`` strings and imported when first used (timm's ``OptimInfo`` names its optimiser class the same
way), so this module imports no torch and ``fmkt-cli export --help`` lists the formats from it.
``run_export`` (checks, device, writing), the CLI's help and tests/test_backend_registry.py read it.

Adding a format: write its module with ``write_export(job) -> [ParityReport, ...]`` (``job`` is a
``pipeline.ExportJob``: it writes its files into ``job.tmp``, names them in ``job.files`` and checks each runtime
with ``job.parity(runner, target)``) and add one entry here; ``detection`` names its writer for detection artifacts
(``export/detection.py``), None when it takes classification only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Union

PRECISIONS = ("fp32", "fp16")  # every format and every bench backend; fp32 is IEEE fp32 (TF32 off), I/O float32

Ref = Union[str, Callable, None]  # a function, or "module:function" imported when first used


def resolve(ref: Ref) -> Callable | None:
    """The function a registry entry names (``"pkg.module:function"`` is imported here, on first use)."""
    if ref is None or callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ExportFormat:
    name: str
    write: Ref  # write_export(job) -> [ParityReport, ...]: writes job.tmp/<files>, names them in job.files
    files: tuple[str, ...]  # what it can write beside export.json and parity.json
    parity: tuple[str, ...]  # the runtimes its parity report checks, in order (each report's target starts so)
    summary: str = ""
    needs: tuple[str, ...] = ()  # modules it imports (onnx_export.require: one sentence naming the extra)
    opset: bool = False  # takes --opset (an ONNX graph; default onnx_export.DEFAULT_OPSET)
    on_device: bool = False  # compiled for --device (otherwise traced on the CPU, whatever --device says)
    refusal: Ref = None  # refusal(device) -> why it cannot be made for that device here (None: go ahead)
    detection: Ref = None  # write_export(job) for a detection artifact (None: the format takes classification only)

    def writer(self) -> Callable:
        return resolve(self.write)

    def refused(self, device) -> str | None:
        return resolve(self.refusal)(device) if self.refusal is not None else None


EXPORT_FORMATS = {f.name: f for f in (
    ExportFormat("onnx", "fmkt.export.onnx_export:write_export", ("model.onnx",), ("onnxruntime",),
                 "ONNX graph (checked, FP16 if asked, metadata and TensorRT readiness inside), parity in ONNX Runtime",
                 needs=("onnx", "onnxruntime"), opset=True, detection="fmkt.export.detection:write_export"),
    ExportFormat("trt", "fmkt.export.tensorrt_engine:write_export", ("model.onnx", "model.plan", "timing.cache"),
                 ("onnxruntime", "TensorRT"), "the onnx format's files, then a TensorRT engine built from them "
                 "(kept without it when TensorRT or a GPU is missing) and the engine's own parity",
                 needs=("onnx", "onnxruntime"), opset=True),
    ExportFormat("aoti", "fmkt.export.aoti:write_export", ("model.pt2",), ("AOTInductor",),
                 "AOTInductor package compiled for --device, compiled and checked in a child process",
                 on_device=True, refusal="fmkt.export.aoti:cuda_refusal"),
)}
