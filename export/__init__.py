"""fmkt.export: the student with K fixed as one static graph (ONNX, TensorRT engine, AOTInductor package).

    from fmkt.export import run_export
    result = run_export("runs/d/artifact", steps=4, fmt="onnx")   # writes model.onnx, export.json, parity.json
    result.raise_for_status()                                      # ParityError / TensorRTUnavailable

Modules: ``graph`` (the unrolled static module), ``onnx_export`` (export, checks, FP16, metadata, TensorRT
readiness), ``trt_operators`` (TensorRT's ONNX operator list, source named), ``tensorrt_engine`` (engine build
and runner), ``aoti`` (AOTInductor), ``parity`` (the report and its gates), ``pipeline`` (the command).
"""
from fmkt.export.graph import UnrolledFlow, static_module
from fmkt.export.parity import GATES, ParityError
from fmkt.export.pipeline import FORMATS, ExportResult, run_export

__all__ = ["run_export", "ExportResult", "static_module", "UnrolledFlow", "ParityError", "GATES", "FORMATS"]
