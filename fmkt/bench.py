"""``fmkt-cli bench``: latency of a student at each K, per backend and precision, next to its accuracy.

    from fmkt.bench import BenchSettings, run_bench
    result = run_bench("runs/distill/artifact", BenchSettings(backends=["eager", "onnxruntime"], batches=[1, 64]))

What is timed, for every (backend, precision, batch) and every variant:
- ``student``: the student alone (normalisation + backbone + its own head, no meta-encoder): the baseline, timed in
  the same run, so the cost of K steps is a ratio (``x student``), not a guess;
- ``K=0`` (the FM-KT^Theta head, when trained) and ``K=n``: the static graph of ``fmkt.export`` with n flow steps
  unrolled (the same module export writes), so eager, compiled and exported numbers describe one computation.

Backends: ``eager`` (PyTorch), ``compile`` (``torch.compile``, one compile per variant and batch), ``cudagraph``
(CUDA-graph replay of eager, CUDA only), ``onnxruntime`` (the exported ONNX; the provider is asserted: CPU on
``--device cpu``, CUDA with IOBinding on ``--device cuda``; never a silent fallback), ``trt`` (a TensorRT engine
built from the ONNX, or the export folder's ``model.plan``; own runner with CUDA events) and ``aoti``
(AOTInductor package compiled for the device). A backend that cannot run here is a row with the reason.

Method: warm-up calls outside the timed loop, then ``iters`` timed rounds; a round times one call of every variant
in turn (interleaved), so a change of machine load touches the baseline and each K alike. CPU: wall clock
(``perf_counter``) per call. CUDA, as trtexec reports it: *device* time is the span between CUDA events recorded on
the stream just before and after the call, with the input already on the GPU; *host* time is end to end, wall clock from the host-to-device copy of a pinned batch to
the device-to-host copy of the logits, synchronised. p50 / p90 / p99 in ms; throughput = batch / mean host latency.
Device time is therefore not pure GPU execution for eager and compile: it spans the host's launch gaps, which is
exactly the cost a launch-bound model pays. fp32 rows run IEEE fp32 (TF32 off everywhere).
Accuracy per K comes from the artifact's metrics (PyTorch evaluation on its test split, in the precision fmkt.json
records: IEEE fp32 since evaluation stopped using autocast); fp16 graphs are held to the export parity gate, not
re-evaluated here.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import gc
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fmkt import __version__
from fmkt.artifact import is_artifact, load_artifact
from fmkt.errors import FmktError
from fmkt.io import atomic_write_bytes
from fmkt.runtime import strict_fp32
from fmkt.student import DeployableModel

BACKENDS = ("eager", "compile", "cudagraph", "onnxruntime", "trt", "aoti")
PRECISIONS = ("fp32", "fp16")
DEFAULT_STEPS = (0, 1, 2, 4, 8)
DEFAULT_BATCHES = (1, 64)
# Rough build costs (s) for the estimate printed before anything runs; measured on a 2-core CPU and an H100.
BUILD_COST = {"cpu": {"compile": 25.0, "aoti": 35.0, "onnxruntime": 1.5, "trt": 0.0},
              "cuda": {"compile": 20.0, "aoti": 45.0, "onnxruntime": 2.0, "trt": 30.0, "cudagraph": 0.2}}


def default_backends(device: str) -> list[str]:
    """eager + onnxruntime on CPU; on CUDA also CUDA-graph replay and TensorRT (compile and aoti compile per K,
    so they are opt-in)."""
    return ["eager", "onnxruntime"] if device == "cpu" else ["eager", "cudagraph", "onnxruntime", "trt"]


@dataclass
class BenchSettings:
    backends: list[str] | None = None  # None: default_backends(device)
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    steps: list[int] | None = None  # None: DEFAULT_STEPS that the model can run (an export folder: its K)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    device: str = "auto"  # auto | cpu | cuda
    warmup: int = 10
    iters: int = 100
    out: str | Path | None = None  # the JSON path; CSV and PNG are written next to it with the same stem


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    variant: str  # "student" | "0" | "1" | ...
    status: str  # ok | unavailable | failed
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput: float | None = None  # images / s from the mean host latency
    device_p50_ms: float | None = None  # CUDA: stream span between events around the call (eager: with launch gaps)
    device_p90_ms: float | None = None
    device_p99_ms: float | None = None
    x_student: float | None = None  # p50 / the student alone's p50 on the same backend, precision and batch
    top1: float | None = None  # the artifact's accuracy at this K (%)
    iters: int = 0
    build_s: float | None = None  # export / compile time of this variant (once per backend, precision, variant)

    @property
    def label(self) -> str:
        return variant_label(self.variant)


@dataclass
class BenchResult:
    rows: list[Row]
    info: dict
    files: dict  # json / csv / png -> path (png absent when it could not be drawn: see info["plot"])
    seconds: float
    estimate_s: float


def variant_label(variant: str) -> str:
    return {"student": "student", "0": "theta (K=0)"}.get(variant, f"K={variant}")


class Unavailable(Exception):
    """This backend cannot run here; the message is the reason shown in the table."""


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    """What bench reads: an artifact (model + meta), or an export folder (its files + the artifact it came from)."""
    path: Path
    model: DeployableModel | None
    meta: dict | None
    export_dir: Path | None = None
    export_meta: dict | None = None
    note: str = ""
    artifact: Path | None = None  # the artifact folder the model was loaded from


def load_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise FmktError(f"{path} does not exist; pass an artifact folder (OUT/artifact) or an export folder.")
    if path.is_dir() and is_artifact(path):
        model, meta = load_artifact(path)
        return Source(path, model, meta, artifact=path)
    export_json = path / "export.json"
    if path.is_dir() and export_json.is_file():
        try:
            emeta = json.loads(export_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FmktError(f"{export_json} is not valid JSON ({exc}); the export folder is damaged.") from None
        if not isinstance(emeta, dict) or emeta.get("format") != "fmkt-export":
            raise FmktError(f"{export_json} is not an fmkt export description.")
        src = (emeta.get("source") or {}).get("artifact")
        model = meta = None
        note = ""
        if src and is_artifact(src):
            model, meta = load_artifact(src)
            if meta.get("weights_sha256") != (emeta.get("source") or {}).get("weights_sha256"):
                raise FmktError(f"the artifact {src} has changed since {path} was exported (sha256 differs); "
                                "export again or bench the artifact itself.")
        else:
            note = (f"the source artifact {src or '(not recorded)'} is not here, so only the exported file is timed "
                    "(no student baseline, no accuracy)")
        return Source(path, model, meta, path, emeta, note, artifact=Path(src) if model is not None else None)
    raise FmktError(f"{path} is neither an fmkt artifact (fmkt.json) nor an export folder (export.json).")


def input_shape(source: Source) -> tuple[int, ...]:
    if source.meta is not None:
        inp = source.meta["model"]["input"]
        return (inp["channels"], *inp["size"])
    shape = source.export_meta["input"]["shape"]
    return tuple(int(s) for s in shape[1:])


def plan_variants(source: Source, steps: list[int] | None) -> tuple[list[str], list[str]]:
    """(variants to time, notes on requested K values that this model cannot run)."""
    notes = []
    if source.export_dir is not None:
        k = int(source.export_meta["steps"])
        if steps is not None and k not in steps:
            raise FmktError(f"{source.path} was exported with --steps {k}; bench it with --steps {k} (or bench the "
                            "artifact to time other K).")
        main = [str(k) if source.export_meta["graph"] != "plain student (no flow)" else "student"]
        return (["student"] + main if source.model is not None and main != ["student"] else main), notes
    model = source.model
    if not model.is_flow:
        if steps is not None and any(k != 0 for k in steps):
            notes.append(f"a plain student (method {source.meta.get('method')}) has no flow steps: timing the "
                         "student alone")
        return ["student"], notes
    asked = list(DEFAULT_STEPS) if steps is None else list(steps)
    ok = model.available_steps(asked)
    if steps is not None and 0 in asked and 0 not in ok:
        notes.append("K=0 needs the FM-KT^Theta head, which this artifact has not: skipped")
    if not ok:
        raise FmktError(f"none of the steps {asked} can run on this artifact (K=0 needs a theta head).")
    return ["student"] + [str(k) for k in ok], notes


def variant_module(model: DeployableModel, variant: str, method: str | None) -> nn.Module:
    from fmkt.export.graph import StudentAlone, static_module

    if variant == "student":
        return StudentAlone(model).eval()
    return static_module(model, int(variant), method)


# --------------------------------------------------------------------------------------------------- runners
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
        try:
            import onnxruntime as ort
        except ImportError:
            raise Unavailable("onnxruntime is not installed (pip install 'fmkt[export]', or onnxruntime-gpu for "
                              "CUDA)") from None
        self.ort, self.cuda = ort, device.type == "cuda"
        available = ort.get_available_providers()
        want = "CUDAExecutionProvider" if self.cuda else "CPUExecutionProvider"
        if want not in available:
            raise Unavailable(f"onnxruntime {ort.__version__} has no {want} here (providers: {', '.join(available)})"
                              + ("; install onnxruntime-gpu; not falling back to the CPU" if self.cuda else ""))
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


# --------------------------------------------------------------------------------------------------- timing
def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 by linear interpolation between order statistics (numpy's default)."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return tuple(float(v) for v in np.percentile(a, [50, 90, 99]))


class Timed:
    """One variant's runner during a measurement: its input buffer, its output buffer and its latencies."""

    def __init__(self, runner: Runner):
        self.runner, self.host, self.device, self.error = runner, [], [], None


@torch.inference_mode()
def time_interleaved(runners: dict, images: torch.Tensor, device: torch.device, warmup: int, iters: int) -> dict:
    """Latencies of every variant at one batch, interleaved: round i times one call of each variant in turn, so
    a change of machine load touches the student baseline and each K alike (the ratios stay honest).

    Returns variant -> Timed (``error`` set when preparing or a call failed; that variant stops, the others go on).
    CPU: host = wall clock of the call. CUDA: host = end to end (pinned batch copied in, the call, logits copied
    back, synchronised); device = CUDA events around the call on torch's current stream."""
    cuda = device.type == "cuda"
    state, feeds, outs = {}, {}, {}
    pinned = images.pin_memory() if cuda else images
    for variant, runner in runners.items():
        t = state[variant] = Timed(runner)
        try:
            feeds[variant] = runner.prepare(images.to(device) if cuda else images)
            y = runner.run(feeds[variant])
            if cuda:
                outs[variant] = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            for _ in range(warmup):
                _call(runner, feeds[variant], pinned, outs.get(variant), cuda)
            if cuda:
                torch.cuda.synchronize()
        except Exception as exc:
            t.error = exc
    live = [v for v in runners if state[v].error is None]
    if cuda:
        events = {v: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)] for v in live}
    for i in range(iters):
        for variant in list(live):
            t = state[variant]
            try:
                if cuda:
                    start = time.perf_counter()
                    feeds[variant].copy_(pinned, non_blocking=True)
                    events[variant][i][0].record()
                    y = t.runner.run(feeds[variant])
                    events[variant][i][1].record()
                    outs[variant].copy_(y, non_blocking=True)
                    torch.cuda.synchronize()
                else:
                    start = time.perf_counter()
                    t.runner.run(feeds[variant])
                t.host.append((time.perf_counter() - start) * 1e3)
            except Exception as exc:
                t.error = exc
                live.remove(variant)
    for variant in live:
        t = state[variant]
        if cuda and t.runner.device_timed:
            t.device = [s.elapsed_time(e) for s, e in events[variant]]
        else:
            t.device = None
    return state


def _call(runner: Runner, x, pinned, out, cuda: bool):
    if cuda:
        x.copy_(pinned, non_blocking=True)
        out.copy_(runner.run(x), non_blocking=True)
    else:
        runner.run(x)


# --------------------------------------------------------------------------------------------------- builders
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240]}" if text else type(exc).__name__


class Builder:
    """Makes a Runner for (backend, precision, variant); caches per variant; exported files win when present."""

    def __init__(self, source: Source, device: torch.device, tmp: Path, example: torch.Tensor):
        self.source, self.device, self.tmp, self.example = source, device, tmp, example
        self.onnx_cache: dict = {}
        self.method = (source.meta or {}).get("method")

    def _module(self, variant: str, precision: str) -> nn.Module:
        if self.source.model is None:
            raise Unavailable(self.source.note)
        module = variant_module(self.source.model, variant, self.method)
        if precision == "fp16":
            if self.device.type == "cpu":
                raise Unavailable("PyTorch fp16 on the CPU is not a deployment path; use --device cuda or fp32")
            from fmkt.export.aoti import HalfPrecision

            module = HalfPrecision(module)  # float32 in and out, like every exported graph
        return module.to(self.device).eval()

    def _exported(self, variant: str, precision: str, fmt: str) -> Path | None:
        """The export folder's own file for this variant, if it is the one exported."""
        e = self.source.export_meta
        if e is None or variant == "student" and e["graph"] != "plain student (no flow)":
            return None
        want = {"onnxruntime": "onnx", "trt": "engine", "aoti": "aoti"}[fmt]
        name = (e.get("files") or {}).get(want)
        if name is None or e.get("precision") != precision:
            return None
        path = self.source.export_dir / name
        return path if path.is_file() else None

    def onnx_bytes(self, variant: str, precision: str) -> bytes:
        key = (variant, precision)
        if key not in self.onnx_cache:
            exported = self._exported(variant, precision, "onnxruntime")
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
                # a copy: the variant shares the artifact's modules, which may live on the GPU
                module = copy.deepcopy(variant_module(self.source.model, variant, self.method)).cpu()
                graph = ox.cleanup(ox.export_onnx(module, self.example[:2].cpu()))
                if precision == "fp16":
                    graph = ox.to_fp16(graph)
                self.onnx_cache[key] = graph.SerializeToString()
        return self.onnx_cache[key]

    def build(self, backend: str, precision: str, variant: str) -> Runner:
        cuda = self.device.type == "cuda"
        if backend == "eager":
            return ModuleRunner(self._module(variant, precision))
        if backend == "compile":
            module = self._module(variant, precision)
            return ModuleRunner(torch.compile(module, dynamic=False))
        if backend == "cudagraph":
            if not cuda:
                raise Unavailable("CUDA-graph replay needs --device cuda")
            return CudaGraphRunner(self._module(variant, precision))
        if backend == "onnxruntime":
            runner = OrtRunner(lambda: self.onnx_bytes(variant, precision), self.device, precision)
            runner.num_classes = self.num_classes
            return runner
        if backend == "trt":
            if not cuda:
                raise Unavailable("TensorRT runs on NVIDIA GPUs; use --device cuda")
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                raise Unavailable("TensorRT is not installed (pip install tensorrt on a CUDA machine)") from None
            engine = self._exported(variant, precision, "trt")
            if engine is None:
                engine = self._build_engine(variant, precision)
            return TrtRunner(engine)
        if backend == "aoti":
            from fmkt.export.aoti import cuda_refusal

            refusal = cuda_refusal(self.device)
            if refusal:
                raise Unavailable(refusal)
            package = self._exported(variant, precision, "aoti")
            if package is None or (self.source.export_meta.get("aoti") or {}).get("device") != self.device.type:
                if self.source.model is None:
                    raise Unavailable(self.source.note)
                package = self.tmp / f"aoti-{variant}-{precision}.pt2"
                self._child("compile", package, variant, precision)
            # Load and run it once in a child first: loading a CUDA package segfaulted the process on an H100
            # (torch 2.11); a crash there is a failed row here, not a dead bench.
            self._child("load", package, variant, precision)
            return ModuleRunner(torch._inductor.aoti_load_package(str(package)))
        raise FmktError(f"unknown backend {backend!r}")

    def _child(self, what: str, package: Path, variant: str, precision: str) -> None:
        from fmkt.export.aoti import run_in_child

        run_in_child(what, artifact=self.source.artifact, graph=variant, package=package,
                     batch=(1, 32, max(2, self.max_batch)), precision=precision, device=self.device,
                     shape=tuple(self.example.shape[1:]))

    def _build_engine(self, variant: str, precision: str) -> Path:
        from fmkt.export.tensorrt_engine import build_engine

        onnx_path = self.tmp / f"{variant}-{precision}.onnx"
        onnx_path.write_bytes(self.onnx_bytes(variant, precision))
        engine = self.tmp / f"{variant}-{precision}.plan"
        build_engine(onnx_path, engine, self.tmp / f"{variant}-{precision}.cache", tuple(self.example.shape[1:]),
                     (1, max(1, min(32, self.max_batch)), max(1, self.max_batch)), precision)
        return engine


# --------------------------------------------------------------------------------------------------- environment
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def stack_versions() -> dict:
    out = {"fmkt": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnxruntime", "tensorrt", "triton", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def device_slug(info: dict) -> str:
    import re

    name = info.get("gpu") or info["cpu"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


# --------------------------------------------------------------------------------------------------- run
def check_settings(s: BenchSettings) -> torch.device:
    from fmkt.engine import resolve_device

    if str(s.device).startswith("cuda") and not torch.cuda.is_available():
        raise FmktError(f"--device {s.device} was asked for but no CUDA GPU is visible here; use --device cpu.")
    if s.device not in ("auto", "cpu") and not str(s.device).startswith("cuda"):
        raise FmktError(f"unknown device {s.device!r}; use auto, cpu or cuda.")
    device = resolve_device(s.device)
    if s.backends is None:
        s.backends = default_backends(device.type)
    bad = [b for b in s.backends if b not in BACKENDS]
    if bad:
        raise FmktError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}.")
    bad = [p for p in s.precisions if p not in PRECISIONS]
    if bad:
        raise FmktError(f"unknown precision {bad[0]!r}; choose fp32 and/or fp16.")
    if not s.batches or any(b < 1 for b in s.batches):
        raise FmktError(f"--batch values must be >= 1, got {s.batches}.")
    if s.iters < 1 or s.warmup < 0:
        raise FmktError(f"--iters must be >= 1 and --warmup >= 0, got {s.iters} and {s.warmup}.")
    return device


def accuracy(meta: dict | None, variant: str) -> float | None:
    metrics = (meta or {}).get("metrics") or {}
    last = metrics.get("last") or {}
    key = "plain" if variant == "student" and "plain" in last else variant
    value = last.get(key)
    return float(value) if value is not None else None


def quick_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` certainly cannot run here, found without building anything (None: it may run)."""
    import importlib.util

    if backend in ("cudagraph", "trt") and device.type != "cuda":
        return "needs CUDA"
    if backend == "trt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if backend == "aoti":
        from fmkt.export.aoti import cuda_refusal

        return cuda_refusal(device)
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "no CUDAExecutionProvider"
    return None


def estimate(source: Source, s: BenchSettings, device: torch.device, variants: list[str]) -> float:
    """Seconds the run should take: time each eager variant once per batch (after one warm call; other backends
    are rarely slower than eager), times the calls asked for, plus the usual build cost of each backend that can
    run here."""
    model = source.model
    total = 0.0
    costs = BUILD_COST[device.type]
    per_call = {}
    for v in variants:
        for b in s.batches:
            if model is None:
                per_call[(v, b)] = 0.005 * b
                continue
            module = variant_module(model, v, (source.meta or {}).get("method")).to(device)
            x = torch.rand((b, *input_shape(source)), device=device)
            with torch.inference_mode():
                for i in range(2):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    module(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
            per_call[(v, b)] = time.perf_counter() - t0
    for backend in s.backends:
        if quick_unavailable(backend, device):
            continue
        for _ in s.precisions:
            for v in variants:
                total += costs.get(backend, 0.0) * (len(s.batches) if backend == "compile" else 1)
                total += sum(per_call[(v, b)] * (s.warmup + s.iters) for b in s.batches)
    return total


def run_bench(path: str | Path, settings: BenchSettings | None = None, *, console=None,
              progress: bool = True) -> BenchResult:
    """Time every (backend, precision, batch, variant); write JSON, CSV and the PNG; return the rows."""
    from rich.console import Console

    s = settings or BenchSettings()
    console = console or Console(stderr=True)
    start = time.perf_counter()
    device = check_settings(s)
    source = load_source(path)
    variants, notes = plan_variants(source, s.steps)
    if source.note:
        notes.append(source.note)
    shape = input_shape(source)
    json_path, csv_path, png_path = output_paths(source, s, device)
    if source.model is not None:
        source.model.to(device).eval()
    est = estimate(source, s, device, variants)
    n_rows = len(s.backends) * len(s.precisions) * len(variants) * len(s.batches)
    console.print(f"bench: {n_rows} measurements ({', '.join(s.backends)} x {', '.join(s.precisions)} x "
                  f"{', '.join(variant_label(v) for v in variants)} x batch {', '.join(map(str, s.batches))}), "
                  f"{s.warmup} warm-up + {s.iters} timed calls each on {device.type}; estimate ~{_dur(est)}.",
                  highlight=False)
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.rand((b, *shape), generator=gen) for b in s.batches}
    num_classes = (source.meta["model"]["num_classes"] if source.meta is not None
                   else source.export_meta["num_classes"])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fmkt-bench-") as tmp:
        builder = Builder(source, device, Path(tmp), images[max(s.batches)] if max(s.batches) >= 2 else
                          torch.rand((2, *shape), generator=gen))
        builder.num_classes, builder.max_batch = num_classes, max(s.batches)
        bar = _progress(console, progress)
        with bar:
            task = bar.add_task("bench", total=n_rows)
            for backend in s.backends:
                for precision in s.precisions:
                    bar.update(task, description=f"{backend} {precision}")
                    with strict_fp32() if precision == "fp32" else contextlib.nullcontext():  # fp32 = IEEE fp32
                        rows.extend(_measure(builder, backend, precision, variants, s, images, device, source,
                                             lambda n: bar.advance(task, n)))
    _ratios(rows)
    seconds = time.perf_counter() - start
    info = {
        "format": "fmkt-bench", "fmkt_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(Path(path).resolve()),
        "artifact_sha256": (source.meta or {}).get("weights_sha256"),
        "model": _model_summary(source),
        "machine": machine_info(device), "versions": stack_versions(),
        "settings": {"backends": s.backends, "batches": s.batches, "variants": variants, "precisions": s.precisions,
                     "device": device.type, "warmup": s.warmup, "iters": s.iters},
        "method": ("host: wall clock per call (CPU), or end to end from the pinned host batch to the logits back on "
                   "the host (CUDA); device (CUDA): the span between CUDA events recorded on the stream just before "
                   "and after the call, input already on the GPU: for eager and compile it includes the gaps while "
                   "the host is still launching kernels (a launch-bound model shows its launch cost there), for "
                   "cudagraph, trt and onnxruntime (CUDA) it is close to pure GPU execution; fp32: IEEE fp32 (TF32 "
                   "off in cuBLAS, cuDNN, TensorRT and ONNX Runtime); x_student: p50 over the student alone's p50 "
                   "on the same backend, precision and batch"),
        "accuracy_precision": ((source.meta or {}).get("metrics") or {}).get(
            "precision", "not recorded (an artifact older than fmkt 0.1's metrics precision: on CUDA its accuracy "
                         "came from bf16 autocast)"),
        "notes": notes, "estimate_s": round(est, 1), "seconds": round(seconds, 1),
    }
    files = write_outputs(rows, info, json_path, csv_path, png_path)
    return BenchResult(rows=rows, info=info, files=files, seconds=seconds, estimate_s=est)


def _measure(builder: Builder, backend, precision, variants, s: BenchSettings, images, device, source,
             advance) -> list[Row]:
    """Rows of one backend and precision: build each variant once, then time all variants interleaved per batch."""
    rows: dict = {}
    runners, build_s = {}, {}
    for variant in variants:
        base = dict(backend=backend, precision=precision, variant=variant, top1=accuracy(source.meta, variant))
        t0 = time.perf_counter()
        try:
            runners[variant] = builder.build(backend, precision, variant)
            build_s[variant] = round(time.perf_counter() - t0, 2)
        except Unavailable as exc:
            rows[variant] = [Row(batch=b, status="unavailable", reason=str(exc), **base) for b in s.batches]
        except FmktError:
            raise
        except Exception as exc:  # a backend that breaks on this model is a row, not a crash
            rows[variant] = [Row(batch=b, status="failed", reason=_one_line(exc), **base) for b in s.batches]
    for variant in runners:
        rows[variant] = []
    for b in s.batches:
        timed = time_interleaved(runners, images[b], device, s.warmup, s.iters) if runners else {}
        for variant, t in timed.items():
            base = dict(backend=backend, precision=precision, variant=variant, top1=accuracy(source.meta, variant),
                        batch=b)
            if t.error is not None:
                status = "unavailable" if isinstance(t.error, Unavailable) else "failed"
                reason = str(t.error) if status == "unavailable" else _one_line(t.error)
                rows[variant].append(Row(status=status, reason=reason, **base))
                continue
            p50, p90, p99 = percentiles(t.host)
            mean = sum(t.host) / len(t.host)
            row = Row(status="ok", p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=mean, throughput=1e3 * b / mean,
                      iters=s.iters, build_s=build_s[variant], **base)
            if t.device:
                row.device_p50_ms, row.device_p90_ms, row.device_p99_ms = percentiles(t.device)
            rows[variant].append(row)
        advance(len(variants))
    if not runners:
        advance(len(variants) * len(s.batches))
    del runners, timed  # free sessions, engines and their thread pools before the next backend
    if backend == "compile":
        torch._dynamo.reset()
    gc.collect()
    return [r for v in variants for r in rows[v]]


def _ratios(rows: list[Row]) -> None:
    base = {(r.backend, r.precision, r.batch): r.p50_ms for r in rows if r.variant == "student" and r.status == "ok"}
    for r in rows:
        ref = base.get((r.backend, r.precision, r.batch))
        if r.status == "ok" and ref:
            r.x_student = r.p50_ms / ref


def _model_summary(source: Source) -> dict:
    if source.meta is None:
        e = source.export_meta
        return {"arch": e.get("arch"), "method": e.get("method"), "steps": e.get("steps"), "input": e["input"]["shape"]}
    spec = source.meta["model"]
    return {"arch": spec["arch"], "method": source.meta.get("method"), "encoder": spec.get("encoder"),
            "schedule": spec.get("schedule"), "classes": spec["num_classes"],
            "input": [spec["input"]["channels"], *spec["input"]["size"]],
            "dataset": (source.meta.get("dataset") or {}).get("name"),
            "parameters": sum(p.numel() for p in source.model.parameters())}


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not (enabled and console.is_terminal))


# --------------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ["backend", "precision", "batch", "variant", "label", "status", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
              "throughput", "device_p50_ms", "device_p90_ms", "device_p99_ms", "x_student", "top1", "iters",
              "build_s", "reason"]


def output_paths(source: Source, s: BenchSettings, device: torch.device) -> tuple[Path, Path, Path]:
    if s.out is not None:
        out = Path(s.out)
        if out.is_dir() or str(s.out).endswith(("/", os.sep)):
            raise FmktError(f"--out {s.out} is a folder; pass a file path such as {Path(s.out) / 'bench.json'}.")
        if out.suffix.lower() != ".json":
            out = out.with_suffix(".json")
    else:
        out = source.path.resolve().parent / "bench" / f"bench-{device.type}.json"
    if out.parent.exists() and not out.parent.is_dir():
        raise FmktError(f"cannot write {out}: {out.parent} is a file.")
    return out, out.with_suffix(".csv"), out.with_suffix(".png")


def row_dict(r: Row) -> dict:
    d = asdict(r)
    d["label"] = r.label
    for k, v in d.items():
        if isinstance(v, float):
            d[k] = round(v, 4)
    return d


def write_outputs(rows: list[Row], info: dict, json_path: Path, csv_path: Path, png_path: Path) -> dict:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files = {"json": str(json_path), "csv": str(csv_path)}
    try:
        png = plot_bytes(rows, info)
        info["plot"] = {"written": True, "file": png_path.name}
    except Unavailable as exc:
        png = None
        info["plot"] = {"written": False, "reason": str(exc)}
    if png is not None:
        atomic_write_bytes(png_path, png)
        files["png"] = str(png_path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row_dict(r).items() if k in CSV_FIELDS})
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    doc = {**info, "rows": [row_dict(r) for r in rows]}
    atomic_write_bytes(json_path, (json.dumps(doc, indent=2) + "\n").encode())
    return files


def plot_bytes(rows: list[Row], info: dict) -> bytes:
    """The Pareto picture: top-1 against p50 latency, one line per backend/precision, K labelled; one panel per
    batch. The student alone is a dashed vertical line (its accuracy is not in the artifact). Without accuracy
    in the artifact, latency against K instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Unavailable("matplotlib is not installed (pip install 'fmkt[bench]'); the PNG was not drawn") from None
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        raise Unavailable("no backend produced a measurement; nothing to plot")
    batches = sorted({r.batch for r in ok})
    has_acc = any(r.top1 is not None for r in ok if r.variant != "student")
    fig, axes = plt.subplots(1, len(batches), figsize=(6.2 * len(batches), 4.6), squeeze=False)
    series = sorted({(r.backend, r.precision) for r in ok})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes[0], batches):
        for i, (backend, precision) in enumerate(series):
            color = colors[i % len(colors)]
            pts = sorted((r for r in ok if r.batch == batch and r.backend == backend and r.precision == precision
                          and r.variant != "student"), key=lambda r: int(r.variant))
            name = f"{backend} {precision}"
            base = next((r for r in ok if r.batch == batch and r.backend == backend and r.precision == precision
                         and r.variant == "student"), None)
            if has_acc:
                pts = [r for r in pts if r.top1 is not None]
                ax.plot([r.p50_ms for r in pts], [r.top1 for r in pts], "o-", color=color, label=name)
                for r in pts:
                    ax.annotate("θ" if r.variant == "0" else f"K={r.variant}", (r.p50_ms, r.top1),
                                textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
                if base is not None:
                    ax.axvline(base.p50_ms, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
            else:
                ax.plot([int(r.variant) for r in pts], [r.p50_ms for r in pts], "o-", color=color, label=name)
                if base is not None:
                    ax.axhline(base.p50_ms, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        ax.set_title(f"batch {batch}")
        if has_acc:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("p50 latency (ms, log); dashed: student alone")
            ax.set_ylabel("top-1 (%)")
        else:
            ax.set_xlabel("K flow steps (0 = theta head)")
            ax.set_ylabel("p50 latency (ms); dashed: student alone")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    m = info["machine"]
    model = info["model"]
    fig.suptitle(f"{model.get('arch')} ({model.get('method')}) on {m.get('gpu') or m['cpu']} - "
                 f"torch {info['versions']['torch']}, {info['date'][:10]}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _collapsed(rows: list[Row]) -> tuple[list[Row], list[tuple]]:
    """Measured rows, and one (backend, precision, status, reason, how many rows) per backend that did not run."""
    ok = [r for r in rows if r.status == "ok"]
    seen: dict = {}
    for r in rows:
        if r.status != "ok":
            key = (r.backend, r.precision, r.status, r.reason)
            seen[key] = seen.get(key, 0) + 1
    return ok, [(*k, n) for k, n in seen.items()]


def result_table(result: BenchResult):
    """The rich table the CLI prints (backends that could not run: ``skipped_lines``)."""
    from rich.table import Table

    s = result.info["settings"]
    cuda = s["device"] == "cuda"
    m = result.info["machine"]
    table = Table(title=f"{result.info['model'].get('arch')} on {m.get('gpu') or m['cpu']} "
                        f"({s['warmup']} warm-up + {s['iters']} timed calls)")
    for col in _HEAD + (["stream p50 ms"] if cuda else []) + ["x student", "top-1 %"]:
        table.add_column(col, justify="left" if col in ("backend", "prec", "model") else "right")
    for r in _collapsed(result.rows)[0]:
        table.add_row(*_cells(r, cuda))
    return table


def skipped_lines(rows: list[Row]) -> list[str]:
    """One line per backend and precision that could not run, with the reason."""
    return [f"{b} {p}: {status}: {reason}" for b, p, status, reason, _ in _collapsed(rows)[1]]


_HEAD = ["backend", "prec", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "img/s"]


def _cells(r: Row, cuda: bool) -> list[str]:
    return [r.backend, r.precision, str(r.batch), r.label, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
            f"{r.throughput:,.0f}"] + \
           ([f"{r.device_p50_ms:.3f}" if r.device_p50_ms is not None else "-"] if cuda else []) + \
           [f"{r.x_student:.2f}x" if r.x_student else "-", "" if r.top1 is None else f"{r.top1:.2f}"]


def markdown_table(rows: list[Row], cuda: bool = False) -> str:
    """The same rows as Markdown (BENCHMARKS.md); backends that could not run follow as a list."""
    head = _HEAD + (["stream p50 ms"] if cuda else []) + ["x student", "top-1 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, cuda)) + " |" for r in _collapsed(rows)[0]]
    skipped = skipped_lines(rows)
    if skipped:
        lines += [""] + [f"- {line}" for line in skipped]
    return "\n".join(lines)
