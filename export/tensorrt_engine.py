"""TensorRT: build a serialized engine from the exported ONNX and run it for the parity check.

Written against TensorRT's Python API (10.x and 11.x; 8.x/9.x where noted): the network is strongly typed
whenever the installed TensorRT can do it (always on in 11.x, ``STRONGLY_TYPED`` in 9.x/10.x), so FP16 comes
from the FP16 ONNX graph; only a TensorRT without strong typing gets the old ``EXPLICIT_BATCH`` and
``BuilderFlag.FP16`` flags. One optimization profile from ``--batch MIN:OPT:MAX``; a timing cache is read from
and written next to the engine. tensorrt is imported lazily: fmkt never needs it to import.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fmkt.errors import FmktError


class TensorRTUnavailable(FmktError):
    """TensorRT or a CUDA GPU is missing (the CLI exits 2 after the ONNX was written)."""


def load_tensorrt(onnx_path: Path):
    """The tensorrt module, or one sentence saying why an engine cannot be built here."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            f"TensorRT is not installed here, so no engine was built; the checked ONNX graph is at {onnx_path} "
            f"(install it with `pip install tensorrt`, fmkt's gpu extra, on a machine with an NVIDIA GPU).") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"TensorRT needs an NVIDIA GPU and none is visible here, so no engine was built; the checked ONNX "
            f"graph is at {onnx_path}.")
    return trt


def _major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path, input_shape: tuple, batch: tuple,
                 precision: str, input_name: str = "images", reuse_cache: Path | None = None,
                 workspace_bytes: int = 1 << 30) -> dict:
    """Parse ``onnx_path``, build with one profile (batch = (min, opt, max)), write the engine and the timing
    cache. ``reuse_cache`` (if it exists) seeds the timing cache. Returns facts for export.json."""
    trt = load_tensorrt(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag_enum = trt.NetworkDefinitionCreationFlag
    flags, typing = 0, "strongly typed"
    if _major(trt) >= 11:
        pass  # strongly typed is the only mode
    elif hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    else:  # TensorRT 8.x: explicit batch, precision by builder flag
        typing = "weakly typed"
        if hasattr(flag_enum, "EXPLICIT_BATCH"):
            flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if typing == "weakly typed" and precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    tf32 = precision != "fp32"
    if not tf32:  # on by default; its ~1e-3 error breaks the fp32 parity gate (1e-4) on Ampere and newer
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch
    profile.set_shape(input_name, (lo, *input_shape), (opt, *input_shape), (hi, *input_shape))
    config.add_optimization_profile(profile)
    seed = reuse_cache.read_bytes() if reuse_cache is not None and reuse_cache.is_file() else b""
    cache = config.create_timing_cache(seed)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see the log above).")
    engine_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": str(trt.__version__), "network": typing, "tf32": tf32,
            "profile": {"min": lo, "opt": opt, "max": hi},
            "timing_cache_reused": bool(seed), "gpu": torch.cuda.get_device_name()}


class EngineRunner:
    """Run a serialized engine on CUDA with torch tensors as the I/O buffers (no pycuda)."""

    def __init__(self, engine_path: Path, input_name: str = "images", output_name: str = "logits"):
        trt = load_tensorrt(engine_path)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the engine {engine_path}.")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
        self.in_dtype = dtypes[self.engine.get_tensor_dtype(input_name)]
        self.out_dtype = dtypes[self.engine.get_tensor_dtype(output_name)]

    def profile_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile 0."""
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return int(lo[0]), int(hi[0])

    def shape_refusal(self, shape: tuple) -> str:
        """Why the engine refuses input ``shape`` (B, C, H, W): an image shape other than the engine's (C, H, W),
        a batch outside its optimization profile, or both; one sentence with what to do."""
        lo, _, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        shape = tuple(int(d) for d in shape)
        wrong, fix = [], []
        if shape[1:] != hi[1:]:
            wrong.append(f"takes images of shape (C, H, W) = {hi[1:]}, not {shape[1:]}")
            fix.append("pass images of the artifact's input size and channels")
        if not lo[0] <= shape[0] <= hi[0]:
            wrong.append(f"takes batches of {lo[0]} to {hi[0]} images (its optimization profile), not {shape[0]}")
            fix.append("rebuild it with `fmkt-cli export --format trt --batch MIN:OPT:MAX` covering the batch")
        if not wrong:  # not expected: TensorRT refuses only these
            return f"the TensorRT engine refused the input shape {shape} (its profile: {lo} to {hi})."
        return f"the TensorRT engine {' and '.join(wrong)}; {' and '.join(fix)}."

    def bind(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the input shape and the I/O addresses for ``images``; returns (input, output) CUDA buffers.

        A shape the engine refuses is one sentence naming what is wrong (set_input_shape only returns False)."""
        if not self.context.set_input_shape(self.input_name, tuple(images.shape)):
            raise FmktError(self.shape_refusal(tuple(images.shape)))
        x = images.to("cuda", self.in_dtype).contiguous()
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype,
                          device="cuda")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return x, out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _, out = self.bind(images)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine.")
        stream.synchronize()
        return out.float().cpu()


def write_export(job) -> list:
    """The trt format (formats.EXPORT_FORMATS): the onnx format's files and parity, then, when that passed,
    model.plan + timing.cache built from model.onnx (an earlier export's cache reused) and the engine's parity.
    Without TensorRT or a GPU the ONNX is kept and ``job.engine_error`` says why."""
    from fmkt.export.onnx_export import write_export as write_onnx

    reports = write_onnx(job)
    if not reports[0].passed:
        return reports
    try:
        load_tensorrt(job.out / "model.onnx")  # one sentence and exit 2 when TensorRT or a GPU is missing
        job.meta["tensorrt"] = build_engine(job.tmp / "model.onnx", job.tmp / "model.plan", job.tmp / "timing.cache",
                                            tuple(job.images.shape[1:]), job.bounds, job.precision,
                                            reuse_cache=job.out / "timing.cache")
    except TensorRTUnavailable as exc:
        job.meta["tensorrt"] = {"built": False, "reason": str(exc)}
        job.engine_error = exc
        return reports
    job.files.update(engine="model.plan", timing_cache="timing.cache")
    return reports + [job.parity(EngineRunner(job.tmp / "model.plan"), f"TensorRT {job.meta['tensorrt']['tensorrt']}")]
