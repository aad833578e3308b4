"""fmkt.export: the student with K fixed as one static graph (ONNX, TensorRT engine, AOTInductor package).

    from fmkt.export import run_export
    result = run_export("runs/d/artifact", steps=4, fmt="onnx")   # writes model.onnx, export.json, parity.json
    result.raise_for_status()                                      # ParityError / TensorRTUnavailable

Modules: ``formats`` (EXPORT_FORMATS: one entry per format, and PRECISIONS; torch-free), ``graph`` (the unrolled
static module), ``onnx_export`` (export, checks, FP16, metadata, TensorRT readiness; the onnx format), ``trt_operators``
(TensorRT's ONNX operator list, source named), ``tensorrt_engine`` (engine build and runner; the trt format),
``aoti`` (AOTInductor; the aoti format), ``parity`` (the report and its gates), ``pipeline`` (the command),
``detection`` and ``detection_parity`` (a detection artifact's ONNX and its parity on boxes, scores and labels).
The rest is imported on first use, so ``fmkt-cli export --help`` reads EXPORT_FORMATS without torch.
"""
from fmkt.export.formats import EXPORT_FORMATS, PRECISIONS, ExportFormat

_LAZY = {"run_export": "pipeline", "ExportResult": "pipeline", "ExportJob": "pipeline", "static_module": "graph",
         "UnrolledFlow": "graph", "ParityError": "parity", "GATES": "parity"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["run_export", "ExportResult", "ExportJob", "static_module", "UnrolledFlow", "ParityError", "GATES",
           "EXPORT_FORMATS", "ExportFormat", "PRECISIONS"]
