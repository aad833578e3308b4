"""``fmkt-cli bench``: latency of a student at each K, per backend and precision, next to its accuracy.

    from fmkt.bench import BenchSettings, run_bench
    result = run_bench("runs/distill/artifact", BenchSettings(backends=["eager", "onnxruntime"], batches=[1, 64]))

What is timed, for every (backend, precision, batch) and every variant:
- ``student``: the student alone (normalisation + backbone + its own head, no meta-encoder): the baseline, timed in
  the same run, so the cost of K steps is a ratio (``x student``), not a guess;
- ``K=0`` (the FM-KT^Theta head, when trained) and ``K=n``: the static graph of ``fmkt.export`` with n flow steps
  unrolled (the same module export writes), so eager, compiled and exported numbers describe one computation.

Backends: one ``BENCH_BACKENDS`` entry each (``backends``: what it needs, how it builds its Runner, its default
and build cost): ``eager``, ``compile``, ``cudagraph``, ``onnxruntime``, ``trt``, ``aoti`` today. A backend that
cannot run here is a row with the reason.

Method: warm-up calls outside the timed loop, then ``iters`` timed rounds; a round times one call of every variant
in turn (interleaved), so a change of machine load touches the baseline and each K alike. CPU: wall clock
(``perf_counter``) per call. CUDA, as trtexec reports it: *device* time is the span between CUDA events recorded on
the stream just before and after the call, with the input already on the GPU; *host* time is end to end, wall clock
from the host-to-device copy of a pinned batch to the device-to-host copy of the logits, synchronised. p50 / p90 /
p99 in ms; throughput = batch / mean host latency. Device time is therefore not pure GPU execution for eager and
compile: it spans the host's launch gaps, which is exactly the cost a launch-bound model pays. fp32 rows run IEEE
fp32 (TF32 off everywhere). Accuracy per K comes from the artifact's metrics (PyTorch evaluation on its test split,
in the precision fmkt.json records: IEEE fp32 since evaluation stopped using autocast); fp16 graphs are held to the
export parity gate, not re-evaluated here.

Layout, by job: ``backends`` (the registry; torch-free), ``plan`` (settings, sources, variants, accuracy, the
estimate), ``runners`` (the Runners, the Builder, the built-in backends' build functions), ``detection`` (a detection
artifact's variants, modules and ONNX Runtime runner; ``--teacher``), ``timing`` (the one timing
harness, also used by benchmarks/), ``report`` (rows, JSON/CSV/PNG, tables); this module runs them (``run_bench``).
They are imported on first use, so ``fmkt-cli bench --help`` reads BENCH_BACKENDS without torch. The machine and
versions in the JSON come from ``fmkt.runtime.environment``.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fmkt.errors import FmktError
from fmkt.export.formats import PRECISIONS, resolve

from .backends import BENCH_BACKENDS, BenchBackend, backends_help, default_backends

_LAZY = {
    "plan": ("DEFAULT_BATCHES", "DEFAULT_STEPS", "BenchSettings", "Source", "Unavailable", "accuracy",
             "check_settings", "estimate", "input_shape", "load_source", "num_classes", "plan_line", "plan_variants",
             "quick_unavailable", "variant_label", "variant_module"),
    "report": ("CSV_FIELDS", "BenchResult", "Row", "_ratios", "device_slug", "markdown_table", "output_paths",
               "plot_bytes", "result_table", "row_dict", "run_info", "skipped_lines", "write_outputs"),
    "runners": ("Builder", "CudaGraphRunner", "ModuleRunner", "OrtRunner", "Runner", "TrtRunner", "_one_line"),
    "timing": ("Timed", "kernel_ms", "median_ms", "percentiles", "time_callable", "time_callables"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}
if TYPE_CHECKING:
    import torch

    from .plan import BenchSettings, Source
    from .report import BenchResult, Row
    from .runners import Builder

__all__ = ["BENCH_BACKENDS", "BenchBackend", "PRECISIONS", "backends_help", "default_backends", "run_bench",
           "time_interleaved", *(n for n in _WHERE if not n.startswith("_"))]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def time_interleaved(runners: dict, images, device, warmup: int, iters: int) -> dict:
    """The timing loop run_bench uses (``timing.time_interleaved``, imported on first call; tests replace it here)."""
    from .timing import time_interleaved as loop

    return loop(runners, images, device, warmup, iters)


def run_bench(path: str | Path, settings: BenchSettings | None = None, *, console=None,
              progress: bool = True) -> BenchResult:
    """Time every (backend, precision, batch, variant); write JSON, CSV and the PNG; return the rows."""
    from rich.console import Console

    from .plan import BenchSettings, check_settings, estimate, load_source, plan_line, plan_variants
    from .report import BenchResult, _ratios, output_paths, run_info, write_outputs

    s = settings or BenchSettings()
    console = console or Console(stderr=True)
    start = time.perf_counter()
    s, device = check_settings(s)
    source = load_source(path, s.teacher)
    variants, notes = plan_variants(source, s.steps)
    if source.task == "detection":
        from .detection import adjust_batches

        s = adjust_batches(s, notes)
    if source.note:
        notes.append(source.note)
    json_path, csv_path, png_path = output_paths(source, s, device)
    for model in (source.model, source.teacher):
        if model is not None:
            model.to(device).eval()
    est = estimate(source, s, device, variants)
    console.print(plan_line(s, variants, device, est), highlight=False)
    rows = _measure_all(source, s, variants, device, console, progress)
    _ratios(rows)
    seconds = time.perf_counter() - start
    info = run_info(path, source, s, device, variants, notes, est, seconds)
    files = write_outputs(rows, info, json_path, csv_path, png_path)
    return BenchResult(rows=rows, info=info, files=files, seconds=seconds, estimate_s=est)


def _measure_all(source: Source, s: BenchSettings, variants: list[str], device: torch.device, console,
                 progress: bool) -> list[Row]:
    """Every backend and precision in turn, on the same random batches (seed 0), with a progress bar."""
    import torch

    from fmkt.runtime import strict_fp32

    from .plan import input_shape, num_classes
    from .runners import Builder

    gen = torch.Generator().manual_seed(0)
    shape = input_shape(source)
    images = {b: torch.rand((b, *shape), generator=gen) for b in s.batches}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fmkt-bench-") as tmp:
        builder = Builder(source, device, Path(tmp), images[max(s.batches)] if max(s.batches) >= 2 else
                          torch.rand((2, *shape), generator=gen))
        builder.num_classes, builder.max_batch = num_classes(source), max(s.batches)
        bar = _progress(console, progress)
        with bar:
            task = bar.add_task("bench", total=len(s.backends) * len(s.precisions) * len(variants) * len(s.batches))
            for backend in s.backends:
                for precision in s.precisions:
                    bar.update(task, description=f"{backend} {precision}")
                    with strict_fp32() if precision == "fp32" else contextlib.nullcontext():  # fp32 = IEEE fp32
                        rows.extend(_measure(builder, backend, precision, variants, s, images, device, source,
                                             lambda n: bar.advance(task, n)))
    return rows


def _measure(builder: Builder, backend, precision, variants, s: BenchSettings, images, device, source,
             advance) -> list[Row]:
    """Rows of one backend and precision: build each variant once, then time all variants interleaved per batch."""
    from .plan import Unavailable, accuracy
    from .report import Row
    from .runners import _one_line
    from .timing import percentiles

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
    cleanup = resolve(BENCH_BACKENDS[backend].cleanup)
    if cleanup is not None:
        cleanup()
    gc.collect()
    return [r for v in variants for r in rows[v]]


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not (enabled and console.is_terminal))
