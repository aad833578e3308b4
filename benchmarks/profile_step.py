"""Where an FM-KT training iteration's time goes: data, teacher forward, student forward, the N encoder steps,
the flow's elementwise math, the losses, backward, optimiser, and the rest (Python glue).

    python benchmarks/profile_step.py --device cpu --out DIR        # 2 cores: ~1-2 minutes
    python benchmarks/profile_step.py --device cuda --out DIR       # each piece synchronised (so: no overlap)

Each forward piece is timed by wrapping the module (or function) that does it, wall clock around the call with the
device synchronised, summed over the step; backward and the optimiser step are timed whole. On CUDA the pieces are
synchronised one by one, so the sum shows where GPU work and launches go, not the overlapped step time (that one is
reported beside it, unsynchronised). Setting: benchmarks/train_speed.py's (resnet32x4 -> resnet8x4, FM-KT DIST,
conv encoder, N = 8, batch 128, 1 x 28 x 28), on the run ``engine.prepare`` builds (its loader, distiller,
optimiser and schedule); the step itself is written out here, so that backward and the optimiser step can be timed
apart. Writes OUT/profile_step_<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_slug, write_json  # noqa: E402
from benchmarks.train_speed import SETTINGS, cycle, prepared  # noqa: E402
from fmkt.flow.sampler import euler_step_reference  # noqa: E402
from fmkt.runtime import environment  # noqa: E402
from fmkt.step import autocast  # noqa: E402


class Clock:
    def __init__(self, device):
        self.cuda, self.spent = device.type == "cuda", defaultdict(float)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.spent[name] += time.perf_counter() - t0
            return out
        return timed


def instrument(d, clock: Clock) -> None:
    """Time the pieces of one FM-KT step by wrapping the modules and functions that do them."""
    s = d.student
    d.teacher.forward = clock.wrap("teacher forward", d.teacher.forward)
    s.backbone.forward_features = clock.wrap("student backbone forward", s.backbone.forward_features)
    s.encoder.forward = clock.wrap("meta-encoder forward (N steps)", s.encoder.forward)
    s.time_embed.forward = clock.wrap("time embedding", s.time_embed.forward)
    s.step_fn = clock.wrap("flow elementwise (Euler step, estimates)", s.step_fn or euler_step_reference)
    d.metric = clock.wrap("losses (D per step)", d.metric)


def profile(device, batch: int, steps: int, small: bool) -> dict:
    st = SETTINGS["small" if small else "default"]
    with prepared("fmkt", batch, device, "torch", steps + 2, device.type == "cuda", st) as run:
        return profile_run(run, device, steps)


def profile_run(run, device, steps: int) -> dict:
    """The pieces of ``steps`` FM-KT iterations of ``run`` (engine.prepare's): the step written out eagerly here,
    so backward and the optimiser step can be timed apart (half the steps plain, half instrumented)."""
    d, opt, sched, amp = run.distiller, run.optimizer, run.scheduler, run.amp
    batches = cycle(run.loader)  # the run holds a few distinct batches

    def run_step(clock=None):
        t0 = time.perf_counter()
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        if clock:
            clock.sync()
            clock.spent["data"] += time.perf_counter() - t0
        with autocast(amp):
            _, losses = d(images, labels, 0.0)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        (clock.wrap("backward (all pieces)", loss.backward) if clock else loss.backward)()
        (clock.wrap("optimiser step", opt.step) if clock else opt.step)()
        sched.step()
        return float(loss.detach())

    for _ in range(2):
        run_step()
    plain = []
    for _ in range(steps // 2):
        t0 = time.perf_counter()
        run_step()
        plain.append(time.perf_counter() - t0)
    clock = Clock(device)
    instrument(d, clock)
    total = 0.0
    for _ in range(steps - steps // 2):
        t0 = time.perf_counter()
        run_step(clock)
        total += time.perf_counter() - t0
    n = steps - steps // 2
    parts = {k: round(1e3 * v / n, 3) for k, v in sorted(clock.spent.items(), key=lambda kv: -kv[1])}
    parts["other (Python glue, head, stacking)"] = round(1e3 * total / n - sum(parts.values()), 3)
    return {"step_ms_unsynchronised": round(1e3 * statistics.median(plain), 3),
            "step_ms_instrumented": round(1e3 * total / n, 3), "parts_ms": parts,
            "parts_percent": {k: round(100 * v / (1e3 * total / n), 1) for k, v in parts.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--small", action="store_true", help="resnet8 models (smoke)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": env,
           "setting": f"FM-KT (DIST, conv, rectified, N=8), batch {args.batch}, "
                      + ("resnet8 -> resnet8 (smoke)" if args.small else "resnet32x4 -> resnet8x4"),
           **profile(device, args.batch, args.steps, args.small)}
    print(f"FM-KT step on {env['machine'].get('gpu') or env['machine']['cpu']}: {res['step_ms_unsynchronised']} ms "
          f"(instrumented {res['step_ms_instrumented']} ms)")
    for k, v in res["parts_ms"].items():
        print(f"  {k:45s} {v:9.2f} ms  {res['parts_percent'][k]:5.1f} %")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"profile_step_{machine_slug(device, env['machine'])}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
