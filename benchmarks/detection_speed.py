"""Images/s of one detection training step (issue 23): none / pkd / fmkt, eager, and captured as a CUDA graph
where torch can capture it.

    python benchmarks/detection_speed.py --device cuda            # scripts/gpu_check.sh's detection stage
    python benchmarks/detection_speed.py --device cpu --iters 3   # on the CPU (slow; small numbers)

The step is the run's own (fmkt.detection.run.build_models: the distiller as `fmkt-cli distill --task detection`
trains it; fmkt.optim; fmkt.capture.EagerStep: forward, backward, clip 2.5, optimiser, LR schedule), on one fixed
batch of random images with 1-4 random boxes each (the step's cost does not depend on what the images show; no
dataset needed on the GPU machine). Student and teacher ``fasterrcnn_resnet18_fpn`` (random weights), 128 x 128,
fp32. ``captured``: the step recorded once as a CUDA graph (torch.cuda.graph) and replayed; torchvision's detectors
have data-dependent shapes (proposal selection, NMS, sampling), so the capture is expected to fail: the row says
why, in one line, and no number is made up. Writes JSON + CSV (benchmarks/results/detection_speed_<machine>.*).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_slug, write_csv, write_json  # noqa: E402

FIELDS = ["method", "encoder", "path", "status", "images_per_s", "ms_per_step", "reason"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="none,pkd,fmkt")
    ap.add_argument("--encoders", default="conv,dwconv", help="the fmkt rows' meta-encoders")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def batch(n: int, size: int, classes: int, device) -> tuple:
    """Random images in [0, 1] and 1-4 random boxes per image (fmkt.detection.run.Targets)."""
    from fmkt.detection.run import Targets

    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    targets = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.25
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                        "labels": torch.randint(1, classes + 1, (k,), generator=g)})
    return images.to(device), Targets(targets).to(device)


def build_step(method: str, encoder: str, size: int, device):
    from fmkt.capture import EagerStep
    from fmkt.config import build_config
    from fmkt.detection.models import create_detector
    from fmkt.detection.run import build_models
    from fmkt.optim import build_optimizer, build_scheduler

    cfg = build_config(None, [{"task": "detection", "student": "fasterrcnn_resnet18_fpn",
                               "method": {"name": method, "encoder": encoder},
                               "detection": {"min_size": size, "max_size": size},
                               "optim": {"lr": 0.01, "clip_grad": 2.5}}])
    torch.manual_seed(1)
    teacher = None if method == "none" else create_detector("fasterrcnn_resnet18_fpn", 11, min_size=size,
                                                            max_size=size).to(device)
    model, _ = build_models(cfg, 10, teacher, device)
    model.train()
    optimizer = build_optimizer(cfg, model.named_parameters())
    return EagerStep(model, optimizer, build_scheduler(cfg, optimizer, 1000), False, 2.5)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, iters: int, device) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def captured(step, images, targets, args, device) -> tuple[float | None, str]:
    """(median seconds of a replay, "") or (None, why the step could not be captured)."""
    from fmkt.errors import first_line

    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(args.warmup):
            step(images, targets, 0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(images, targets, 0.5)
    except Exception as exc:  # data-dependent shapes, a host sync: the capture's own error, in one line
        torch.cuda.synchronize()
        return None, first_line(exc, 200)
    return timed(graph.replay, 1, args.iters, device), ""


def rows_for(method: str, encoder: str, args, device) -> list[dict]:
    step = build_step(method, encoder, args.size, device)
    images, targets = batch(args.batch, args.size, 10, device)
    seconds = timed(lambda: step(images, targets, 0.5), args.warmup, args.iters, device)
    rows = [{"method": method, "encoder": encoder if method == "fmkt" else "", "path": "eager", "status": "ok",
             "images_per_s": round(args.batch / seconds, 2), "ms_per_step": round(1e3 * seconds, 2), "reason": ""}]
    replay, why = captured(step, images, targets, args, device)
    rows.append({**rows[0], "path": "captured", "status": "ok" if replay else "unavailable",
                 "images_per_s": round(args.batch / replay, 2) if replay else None,
                 "ms_per_step": round(1e3 * replay, 2) if replay else None, "reason": why})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from fmkt.runtime import environment

    device = torch.device(args.device)
    env = environment(device)
    rows = []
    for method in args.methods.split(","):
        for encoder in args.encoders.split(",") if method == "fmkt" else ["conv"]:
            rows += rows_for(method, encoder, args, device)
            for r in rows[-2:]:
                rate = f"{r['images_per_s']:.1f} img/s" if r["images_per_s"] else f"n/a ({r['reason']})"
                print(f"{method:5s} {r['encoder'] or '-':7s} {r['path']:9s} {rate}", flush=True)
    name = f"detection_speed_{machine_slug(device, env['machine'], with_device=True)}"
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(out / f"{name}.json", {"settings": settings, "environment": env, "date": time.strftime("%Y-%m-%d"),
                                      "rows": rows})
    write_csv(out / f"{name}.csv", rows, FIELDS)
    print(f"wrote {out / name}.json, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
