"""BENCH_BACKENDS: the one list of bench backends (``fmkt-cli bench --backends``).

A backend is one entry: what it needs (CUDA, modules, a refusal found without building), how it builds a Runner
for a (precision, variant) (its ``build(builder, precision, variant)``; the Runner is how it runs), whether the
default ``--backends`` of a device include it, its rough build cost for the estimate and what to free once its rows
are done. Functions are named as ``"module:function"`` strings and imported when first used (timm's ``OptimInfo``
names its optimiser class the same way), so this module imports no torch and ``fmkt-cli bench --help`` lists the
backends from it. ``check_settings``, ``estimate``, ``Builder.build``, ``run_bench``, the CLI's help and
tests/test_backend_registry.py read it. Bench checks no parity: the exported graphs it times hold the export gate.

Adding a backend: write its module with ``build(builder, precision, variant) -> Runner`` (``runners.Builder``
hands it the variant's module, its ONNX bytes and the export folder's own file) and add one entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from fmkt.export.formats import Ref, resolve

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchBackend:
    name: str
    build: Ref  # build(builder, precision, variant) -> Runner (raises runners.Unavailable for a reason of its own)
    summary: str = ""
    needs_cuda: str = ""  # the reason shown when --device is not CUDA ("": runs on either)
    needs: tuple[tuple[str, str], ...] = ()  # (module, the reason shown when it cannot be imported)
    refusal: Ref = None  # refusal(device) -> why it cannot run there, found without building (None: it may)
    default_on: tuple[str, ...] = ()  # the device types whose default --backends include it
    build_cost: dict = field(default_factory=dict)  # rough build seconds per device type (2-core CPU, H100)
    build_per_batch: bool = False  # builds once per batch size, not once per variant
    cleanup: Ref = None  # called once after its rows (compile: forget its compiled graphs)

    def unavailable(self, device) -> str | None:
        """Why it cannot run on ``device`` (torch.device), found without building anything (None: it may run)."""
        if self.needs_cuda and device.type != "cuda":
            return self.needs_cuda
        for module, reason in self.needs:
            try:
                importlib.import_module(module)
            except ImportError:
                return reason
        return resolve(self.refusal)(device) if self.refusal is not None else None


BENCH_BACKENDS = {b.name: b for b in (
    BenchBackend("eager", "fmkt.bench.runners:build_eager", "PyTorch", default_on=DEVICES),
    BenchBackend("compile", "fmkt.bench.runners:build_compile", "torch.compile, one compile per variant and batch",
                 build_cost={"cpu": 25.0, "cuda": 20.0}, build_per_batch=True, cleanup="torch._dynamo:reset"),
    BenchBackend("cudagraph", "fmkt.bench.runners:build_cudagraph", "CUDA-graph replay of eager",
                 needs_cuda="CUDA-graph replay needs --device cuda", default_on=("cuda",), build_cost={"cuda": 0.2}),
    BenchBackend("onnxruntime", "fmkt.bench.runners:build_onnxruntime",
                 "the exported ONNX (the export folder's own, or exported here); the provider is asserted: CPU on "
                 "--device cpu, CUDA with IOBinding on --device cuda, never a silent fallback",
                 needs=(("onnxruntime", "onnxruntime is not installed (pip install 'fmkt[export]', or onnxruntime-gpu "
                                        "for CUDA)"),),
                 refusal="fmkt.bench.runners:ort_refusal", default_on=DEVICES, build_cost={"cpu": 1.5, "cuda": 2.0}),
    BenchBackend("trt", "fmkt.bench.runners:build_trt",
                 "a TensorRT engine built from the ONNX, or the export folder's model.plan; buffers on torch's stream",
                 needs_cuda="TensorRT runs on NVIDIA GPUs; use --device cuda",
                 needs=(("tensorrt", "TensorRT is not installed (pip install tensorrt on a CUDA machine)"),),
                 default_on=("cuda",), build_cost={"cpu": 0.0, "cuda": 30.0}),
    BenchBackend("aoti", "fmkt.bench.runners:build_aoti",
                 "AOTInductor package compiled for the device, compiled and first loaded in a child process",
                 refusal="fmkt.export.aoti:cuda_refusal", build_cost={"cpu": 35.0, "cuda": 45.0}),
)}


def default_backends(device: str) -> list[str]:
    """The backends of ``--backends``'s default on a device type (eager + onnxruntime on CPU; on CUDA also CUDA-graph
    replay and TensorRT: compile and aoti compile per K, so they are opt-in)."""
    return [name for name, b in BENCH_BACKENDS.items() if device in b.default_on]


def backends_help() -> str:
    """``fmkt-cli bench --backends``'s help, from the registry."""
    return (f"Comma list of {', '.join(BENCH_BACKENDS)}. Default: {','.join(default_backends('cpu'))} on CPU; "
            f"{','.join(default_backends('cuda'))} on CUDA.")
