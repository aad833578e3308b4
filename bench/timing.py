"""The one timing harness of fmkt: `fmkt-cli bench`, benchmarks/latency.py (through bench), benchmarks/kernels.py
and benchmarks/triton_vs_torch.py all time here.

- ``time_interleaved``: bench's measurement of several runners at one batch, round by round, with host (end to end)
  and device (CUDA events on the stream) latencies.
- ``time_callables`` / ``time_callable``: wall-clock ms per call of plain callables (CUDA synchronised around each
  call), interleaved round by round when there are several; for the benchmark scripts.
- ``kernel_ms``: a GPU kernel's median the way Triton measures kernels (``triton.testing.do_bench``: L2 flushed
  between calls); in Triton's CPU interpreter, the median of ``time_callable``.
- ``percentiles``: p50 / p90 / p99 of a list of latencies.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 by linear interpolation between order statistics (numpy's default)."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return tuple(float(v) for v in np.percentile(a, [50, 90, 99]))


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_callables(fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: int = 10,
                   iters: int = 100) -> dict[str, list[float]]:
    """Wall-clock ms of each call of every ``fn()``, after ``warmup`` untimed calls of each: round i calls each fn
    once in turn, so a change of machine load touches them alike. On CUDA the device is synchronised before and
    after each timed call (host time, end to end)."""
    cuda = torch.device(device).type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            _sync(cuda)
            start = time.perf_counter()
            fn()
            _sync(cuda)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_callable(fn: Callable[[], object], device: torch.device | str, warmup: int = 10,
                  iters: int = 100) -> list[float]:
    """Wall-clock ms of each of ``iters`` calls of ``fn()`` after ``warmup`` untimed ones (see time_callables)."""
    return time_callables({"fn": fn}, device, warmup, iters)["fn"]


def median_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 10, iters: int = 100) -> float:
    return statistics.median(time_callable(fn, device, warmup, iters))


def kernel_ms(fn: Callable[[], object], device: torch.device | str, quick: bool = False) -> float:
    """Median ms of a GPU kernel call: ``triton.testing.do_bench`` on CUDA (warm-up 25 ms and 100 ms of repetitions;
    quick: 10 and 40), L2 flushed between calls as Triton does; elsewhere (Triton's interpreter, where times say
    nothing about speed) the median of 3 wall-clock calls after one warm-up."""
    if torch.device(device).type != "cuda":
        return median_ms(fn, device, warmup=1, iters=3)
    from triton.testing import do_bench

    warmup, rep = (10, 40) if quick else (25, 100)
    return float(do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])[0])


# --------------------------------------------------------------------------------------------------- bench's loop
class Timed:
    """One variant's runner during a measurement: its input buffer, its output buffer and its latencies."""

    def __init__(self, runner):
        self.runner, self.host, self.device, self.error = runner, [], [], None


@torch.inference_mode()
def time_interleaved(runners: dict, images: torch.Tensor, device: torch.device, warmup: int, iters: int) -> dict:
    """Latencies of every variant at one batch, interleaved: round i times one call of each variant in turn, so
    a change of machine load touches the student baseline and each K alike (the ratios stay honest).

    ``runners``: variant -> a bench Runner (``prepare(x)``, ``run(x)``, ``device_timed``). Returns variant -> Timed
    (``error`` set when preparing or a call failed; that variant stops, the others go on). CPU: host = wall clock
    of the call. CUDA: host = end to end (pinned batch copied in, the call, logits copied back, synchronised);
    device = CUDA events around the call on torch's current stream."""
    cuda = device.type == "cuda"
    pinned = images.pin_memory() if cuda else images
    state, feeds, outs = _warm(runners, images, pinned, device, warmup)
    live = [v for v in runners if state[v].error is None]
    events = {v: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)] for v in live} if cuda else {}
    for i in range(iters):
        for variant in list(live):
            t = state[variant]
            try:
                start = time.perf_counter()
                if cuda:
                    feeds[variant].copy_(pinned, non_blocking=True)
                    events[variant][i][0].record()
                    y = t.runner.run(feeds[variant])
                    events[variant][i][1].record()
                    outs[variant].copy_(y, non_blocking=True)
                    torch.cuda.synchronize()
                else:
                    t.runner.run(feeds[variant])
                t.host.append((time.perf_counter() - start) * 1e3)
            except Exception as exc:
                t.error = exc
                live.remove(variant)
    for variant in live:
        t = state[variant]
        t.device = [s.elapsed_time(e) for s, e in events[variant]] if cuda and t.runner.device_timed else None
    return state


def _warm(runners: dict, images, pinned, device: torch.device, warmup: int) -> tuple[dict, dict, dict]:
    """Prepare every runner (its input buffer; on CUDA a pinned output buffer) and make its warm-up calls."""
    cuda = device.type == "cuda"
    state, feeds, outs = {}, {}, {}
    for variant, runner in runners.items():
        t = state[variant] = Timed(runner)
        try:
            feeds[variant] = runner.prepare(images.to(device) if cuda else images)
            y = runner.run(feeds[variant])
            if cuda:
                outs[variant] = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            for _ in range(warmup):
                _call(runner, feeds[variant], pinned, outs.get(variant), cuda)
            _sync(cuda)
        except Exception as exc:
            t.error = exc
    return state, feeds, outs


def _call(runner, x, pinned, out, cuda: bool):
    if cuda:
        x.copy_(pinned, non_blocking=True)
        out.copy_(runner.run(x), non_blocking=True)
    else:
        runner.run(x)
