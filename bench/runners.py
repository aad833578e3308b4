"""How the backends bench times run: a Runner per (backend, precision, variant), made by the Builder through the
backend's ``BENCH_BACKENDS`` entry (bench/backends.py: what it needs, then its ``build``; the ``build_*`` functions
below are those of the six built-in backends). A backend that cannot run here raises Unavailable.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fmkt.errors import FmktError, first_line

from fmkt.export.formats import resolve

from .backends import BENCH_BACKENDS
from .plan import Source, Unavailable, source_module, variant_module


class Runner:
    """prepare(x) -> the tensor/array the timed loop feeds (copying each new batch into it on CUDA); run(x)."""
    device_timed = True  # CUDA events on torch's current stream bracket the work

    def prepare(self, x: torch.Tensor):
        return x

    def run(self, x):
        raise NotImplementedError


class ModuleRunner(Runner):
    def __init__(self, module: nn.Module):
        self.module = module

    def run(self, x):
        return self.module(x)


class CudaGraphRunner(Runner):
    """Capture the eager module once per batch shape; replay reads its static input buffer."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.graph = self.static_x = self.static_y = None

    def prepare(self, x):
        self.static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm the allocator and cuDNN outside capture
                self.module(self.static_x)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_y = self.module(self.static_x)
        return self.static_x

    def run(self, x):
        self.graph.replay()
        return self.static_y


class OrtRunner(Runner):
    """ONNX Runtime with the provider asserted; on CUDA, IOBinding on torch's stream (no host copies timed)."""

    def __init__(self, model_bytes: Callable[[], bytes], device: torch.device, precision: str = "fp32"):
        import onnxruntime as ort  # installed: BENCH_BACKENDS["onnxruntime"].needs

        refusal = ort_refusal(device)
        if refusal:
            raise Unavailable(refusal)
        self.ort, self.cuda = ort, device.type == "cuda"
        want = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The K variants' sessions are timed interleaved; a session whose threads spin-wait after its call would
        # steal the cores of the next one (p90 at batch 64 on 2 cores went 2-3x over p50), so no spinning.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.cuda:
            stream = torch.cuda.current_stream().cuda_stream
            from fmkt.export.onnx_export import cuda_provider_options

            providers = [(want, {"device_id": torch.cuda.current_device(), "has_user_compute_stream": "1",
                                 "user_compute_stream": str(stream), **cuda_provider_options(precision)})]
        else:
            providers = [want]
        self.session = ort.InferenceSession(model_bytes(), opts, providers=providers)
        got = self.session.get_providers()[0]
        if got != want:
            raise Unavailable(f"onnxruntime placed the graph on {got}, not {want}; not timing a fallback")
        self.provider = got
        self.out_dtype = torch.float32
        self.binding = None

    def prepare(self, x):
        if not self.cuda:
            return x.numpy()
        from fmkt.export.onnx_export import INPUT_NAME, OUTPUT_NAME

        self.y = torch.empty((x.shape[0], self.num_classes), device=x.device, dtype=self.out_dtype)
        self.binding = self.session.io_binding()
        self.binding.bind_input(INPUT_NAME, "cuda", x.device.index or 0, _np_dtype(x.dtype), tuple(x.shape),
                                x.data_ptr())
        self.binding.bind_output(OUTPUT_NAME, "cuda", x.device.index or 0, _np_dtype(self.y.dtype),
                                 tuple(self.y.shape), self.y.data_ptr())
        return x

    def run(self, x):
        if not self.cuda:
            from fmkt.export.onnx_export import INPUT_NAME, OUTPUT_NAME

            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        self.session.run_with_iobinding(self.binding)
        return self.y


def ort_refusal(device: torch.device) -> str | None:
    """Why ONNX Runtime cannot run on ``device`` here: its execution provider is missing (never a silent fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if want in available:
        return None
    return (f"onnxruntime {ort.__version__} has no {want} here (providers: {', '.join(available)})"
            + ("; install onnxruntime-gpu; not falling back to the CPU" if device.type == "cuda" else ""))


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


class TrtRunner(Runner):
    """A serialized TensorRT engine; buffers are torch CUDA tensors, enqueued on torch's current stream."""

    def __init__(self, engine_path: Path):
        from fmkt.export.tensorrt_engine import EngineRunner

        self.engine = EngineRunner(engine_path)

    def prepare(self, x):
        self.x, self.y = self.engine.bind(x)
        return self.x

    def run(self, x):
        if not self.engine.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine.")
        return self.y


# --------------------------------------------------------------------------------------------------- the builder
def _one_line(exc: BaseException) -> str:
    return first_line(exc, 240)


class Builder:
    """Makes a Runner for (backend, precision, variant) through the backend's BENCH_BACKENDS entry; caches ONNX
    graphs per variant; the export folder's own files win when present."""

    def __init__(self, source: Source, device: torch.device, tmp: Path, example: torch.Tensor):
        self.source, self.device, self.tmp, self.example = source, device, tmp, example
        self.onnx_cache: dict = {}
        self.method = (source.meta or {}).get("method")

    def build(self, backend: str, precision: str, variant: str) -> Runner:
        entry = BENCH_BACKENDS.get(backend)
        if entry is None:
            raise FmktError(f"unknown backend {backend!r}")
        reason = entry.unavailable(self.device)
        if reason:
            raise Unavailable(reason)
        return resolve(entry.build)(self, precision, variant)

    def module(self, variant: str, precision: str) -> nn.Module:
        """The variant's PyTorch module on the device (fp16: half inside, float32 in and out)."""
        if self.source.model is None:
            raise Unavailable(self.source.note)
        module = source_module(self.source, variant)
        if precision == "fp16":
            if self.source.task == "detection":
                raise Unavailable("detection is timed in fp32 only (its export is fp32 only)")
            if self.device.type == "cpu":
                raise Unavailable("PyTorch fp16 on the CPU is not a deployment path; use --device cuda or fp32")
            from fmkt.export.aoti import HalfPrecision

            module = HalfPrecision(module)  # float32 in and out, like every exported graph
        return module.to(self.device).eval()

    def exported(self, variant: str, precision: str, key: str) -> Path | None:
        """The export folder's own file (its export.json ``files[key]``) for this variant, if it is the one exported."""
        e = self.source.export_meta
        if e is None or variant == "student" and e["graph"] != "plain student (no flow)":
            return None
        name = (e.get("files") or {}).get(key)
        if name is None or e.get("precision") != precision:
            return None
        path = self.source.export_dir / name
        return path if path.is_file() else None

    def onnx_bytes(self, variant: str, precision: str) -> bytes:
        key = (variant, precision)
        if key not in self.onnx_cache:
            exported = self.exported(variant, precision, "onnx")
            if exported is not None:
                self.onnx_cache[key] = exported.read_bytes()
            else:
                from fmkt.export import onnx_export as ox

                if self.source.model is None:
                    raise Unavailable(self.source.note)
                try:
                    ox.require("onnx")
                except FmktError as exc:
                    raise Unavailable(str(exc)) from None
                if self.source.task == "detection":
                    from .detection import detection_onnx_bytes

                    self.onnx_cache[key] = detection_onnx_bytes(self.source, variant, self.example)
                    return self.onnx_cache[key]
                # a copy: the variant shares the artifact's modules, which may live on the GPU
                module = copy.deepcopy(variant_module(self.source.model, variant, self.method)).cpu()
                self.onnx_cache[key] = ox.onnx_graph(module, self.example[:2].cpu(), precision).SerializeToString()
        return self.onnx_cache[key]

    def aoti_child(self, what: str, package: Path, variant: str, precision: str) -> None:
        from fmkt.export.aoti import run_in_child

        run_in_child(what, artifact=self.source.artifact, graph=variant, package=package,
                     batch=(1, 32, max(2, self.max_batch)), precision=precision, device=self.device,
                     shape=tuple(self.example.shape[1:]))

    def trt_engine(self, variant: str, precision: str) -> Path:
        from fmkt.export.tensorrt_engine import build_engine

        onnx_path = self.tmp / f"{variant}-{precision}.onnx"
        onnx_path.write_bytes(self.onnx_bytes(variant, precision))
        engine = self.tmp / f"{variant}-{precision}.plan"
        build_engine(onnx_path, engine, self.tmp / f"{variant}-{precision}.cache", tuple(self.example.shape[1:]),
                     (1, max(1, min(32, self.max_batch)), max(1, self.max_batch)), precision)
        return engine


# ------------------------------------------------ the built-in backends' build(builder, precision, variant) -> Runner
def build_eager(b: Builder, precision: str, variant: str) -> Runner:
    return ModuleRunner(b.module(variant, precision))


def build_compile(b: Builder, precision: str, variant: str) -> Runner:
    return ModuleRunner(torch.compile(b.module(variant, precision), dynamic=False))


def build_cudagraph(b: Builder, precision: str, variant: str) -> Runner:
    return CudaGraphRunner(b.module(variant, precision))


def build_onnxruntime(b: Builder, precision: str, variant: str) -> Runner:
    if b.source.task == "detection":
        from .detection import DetectionOrtRunner as cls
    else:
        cls = OrtRunner
    runner = cls(lambda: b.onnx_bytes(variant, precision), b.device, precision)
    runner.num_classes = b.num_classes
    return runner


def build_trt(b: Builder, precision: str, variant: str) -> Runner:
    return TrtRunner(b.exported(variant, precision, "engine") or b.trt_engine(variant, precision))


def build_aoti(b: Builder, precision: str, variant: str) -> Runner:
    package = b.exported(variant, precision, "aoti")
    if package is None or (b.source.export_meta.get("aoti") or {}).get("device") != b.device.type:
        if b.source.model is None:
            raise Unavailable(b.source.note)
        package = b.tmp / f"aoti-{variant}-{precision}.pt2"
        b.aoti_child("compile", package, variant, precision)
    # Load and run it once in a child first: loading a CUDA package segfaulted the process on an H100
    # (torch 2.11); a crash there is a failed row here, not a dead bench.
    b.aoti_child("load", package, variant, precision)
    return ModuleRunner(torch._inductor.aoti_load_package(str(package)))
