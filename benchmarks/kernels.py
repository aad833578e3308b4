"""Benchmark of fmkt.kernels against eager torch (and torch.compile): times, GB/s, ratios; writes CSV + JSON.

    python benchmarks/kernels.py                       # on a CUDA GPU: the full benchmark (~2-3 minutes)
    python benchmarks/kernels.py --quick               # fewer sizes, shorter timing
    python benchmarks/kernels.py --smoke               # no GPU: tiny shapes in Triton's interpreter (plumbing only)

1. Fused step (forward, backward, forward+backward), fused vs eager ``euler_step_reference`` vs
   ``torch.compile`` of it, from a CIFAR student's last map (resnet8x4: 256 x 8 x 8) to a large map.
   Bytes moved: forward reads x, v, z1 and writes x_next, u_next (5 N elements); backward reads the two output
   gradients and writes dx, dv, dz1 (5 N). GB/s is set against the card's copy bandwidth, measured in the same
   run (``y.copy_(x)`` on 512 MiB: 2 x bytes / time).
2. Whole sampler (``mlp`` encoder, C = 256, hidden 512, depth 2, batch 256, 8 x 8) vs the eager K-step loop
   (no grad) for K = 1, 2, 4, 8.
Times are ``triton.testing.do_bench`` medians (ms) on CUDA; in --smoke mode wall-clock medians of the
interpreter, which say nothing about speed (both through ``fmkt.bench.timing.kernel_ms``, the one timing harness).
Results: OUT/kernels_<gpu>.json and .csv, keyed by GPU name and versions (``fmkt.runtime.environment``).
Targets (GPU): fused step >= 80 % of copy bandwidth on large maps and >= 2x eager for forward+backward; whole
sampler >= 3x the eager loop at K = 8, batch 256.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import slug, write_csv, write_json  # noqa: E402
from fmkt.bench.timing import kernel_ms  # noqa: E402
from fmkt.runtime import environment  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEP_SIZES = [  # (label, B, C, H, W)
    ("cifar last map (resnet8x4)", 256, 256, 8, 8),
    ("16x16 map", 256, 128, 16, 16),
    ("32x32 map", 128, 128, 32, 32),
    ("large map 56x56", 64, 256, 56, 56),
]
SMOKE_STEP_SIZES = [("smoke", 2, 5, 3, 7), ("smoke large", 2, 8, 16, 16)]
SAMPLER_STEPS = (1, 2, 4, 8)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--quick", action="store_true", help="the smallest and the largest map only; shorter timing")
    ap.add_argument("--smoke", action="store_true", help="no GPU: run every path once on tiny shapes, interpreted")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=None, help="folder for the JSON/CSV (default benchmarks/results; none in "
                                                "--smoke mode unless given)")
    return ap.parse_args(argv)


def versions(device: torch.device) -> dict:
    """The file's meta keys (torch, triton, python, platform, cuda, date, device), plus the machine and versions of
    fmkt.runtime.environment."""
    env = environment(device)
    v, m = env["versions"], env["machine"]
    return {"torch": v["torch"], "triton": v["triton"], "python": v["python"], "platform": m["platform"],
            "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": m.get("gpu") or "cpu (Triton interpreter)", "machine": m, "versions": v}


def copy_bandwidth(timer: Callable, device: torch.device, smoke: bool) -> float:
    """GB/s of y.copy_(x) (read + write) on a large buffer."""
    n = (1 << 20) if smoke else (512 << 20) // 4
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def bench_step(timer, device, dtype, sizes, use_compile, copy_gbs):
    from fmkt.flow.sampler import euler_step_reference
    from fmkt.kernels.euler_step import FusedEulerStep

    dt, p, q = 0.125, 1.0, -1.0
    compiled = None
    if use_compile:
        cfg = torch._dynamo.config  # one graph per size and grad mode: lift the recompile limit (8 by default)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        compiled = torch.compile(euler_step_reference, dynamic=False)
    impls = {"eager": euler_step_reference, "fused": lambda *a: FusedEulerStep.apply(*a)}
    if compiled is not None:
        impls["compile"] = compiled
    rows = []
    for label, b, c, h, w in sizes:
        n = b * c * h * w
        size = torch.tensor([], dtype=dtype).element_size()
        step_bytes = 5 * n * size
        x, v, z = (torch.randn(b, c, h, w, device=device, dtype=dtype) for _ in range(3))
        e = torch.randn(1, c, device=device, dtype=dtype)
        gx, gu = torch.randn_like(x), torch.randn_like(x)
        gp = torch.randn(b, c, device=device, dtype=dtype)
        row = {"op": "fused_step", "size": label, "shape": f"{b}x{c}x{h}x{w}", "dtype": str(dtype).split(".")[1]}
        for name, fn in impls.items():
            with torch.no_grad():
                row[f"fwd_ms_{name}"] = timer(lambda: fn(x, v, z, e, dt, p, q))
            ins = [t.clone().requires_grad_() for t in (x, v, z, e)]
            outs = fn(*ins, dt, p, q)
            row[f"bwd_ms_{name}"] = timer(lambda: torch.autograd.grad(outs, ins, (gx, gu, gp), retain_graph=True))

            def fwd_bwd():
                o = fn(*ins, dt, p, q)
                torch.autograd.grad(o, ins, (gx, gu, gp))

            row[f"fwd_bwd_ms_{name}"] = timer(fwd_bwd)
        for phase in ("fwd", "bwd"):
            gbs = step_bytes / (row[f"{phase}_ms_fused"] * 1e-3) / 1e9
            row[f"{phase}_gbs_fused"] = gbs
            row[f"{phase}_pct_copy"] = 100.0 * gbs / copy_gbs
        for phase in ("fwd", "bwd", "fwd_bwd"):
            row[f"{phase}_x_eager"] = row[f"{phase}_ms_eager"] / row[f"{phase}_ms_fused"]
            if compiled is not None:
                row[f"{phase}_x_compile"] = row[f"{phase}_ms_compile"] / row[f"{phase}_ms_fused"]
        rows.append(row)
        del x, v, z, gx, gu, ins, outs
    return rows


def bench_sampler(timer, device, dtype, smoke):
    from fmkt.flow.encoders import MLPEncoder, TimeEmbedding
    from fmkt.flow.sampler import run_sampler
    from fmkt.flow.schedules import build_schedule
    from fmkt.kernels.mlp_sampler import mlp_sampler_forward

    b, c, h, w = (2, 24, 3, 5) if smoke else (256, 256, 8, 8)
    torch.manual_seed(0)
    enc = MLPEncoder(c).to(device=device, dtype=dtype).eval()
    temb = TimeEmbedding(c).to(device)
    z1 = torch.randn(b, c, h, w, device=device, dtype=dtype)
    rows = []
    for k in SAMPLER_STEPS if not smoke else (1, 2):
        steps = build_schedule("rectified").steps(k)
        with torch.no_grad():
            eager = timer(lambda: run_sampler(z1, enc, temb, steps).mean_pooled())
            fused = timer(lambda: mlp_sampler_forward(z1, enc, temb, steps))
            ref = run_sampler(z1, enc, temb, steps).mean_pooled().float()
            err = (mlp_sampler_forward(z1, enc, temb, steps)[0].float() - ref).abs().max().item()
        rows.append({"op": "mlp_sampler", "size": f"K={k}", "shape": f"{b}x{c}x{h}x{w}",
                     "dtype": str(dtype).split(".")[1], "eager_ms": eager, "fused_ms": fused,
                     "x_eager": eager / fused, "max_abs_err": err})
    return rows


def write_results(out: Path, meta: dict, rows: list) -> tuple[Path, Path]:
    stem = slug(f"kernels_{meta['device']}_torch{meta['torch']}_triton{meta['triton']}")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("op", "size", "shape", "dtype"), k))
    return (write_json(out / f"{stem}.json", {"meta": meta, "rows": rows}),
            write_csv(out / f"{stem}.csv", rows, keys))


def print_tables(meta, step_rows, sampler_rows, copy_gbs, use_compile):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | copy bandwidth "
          f"{copy_gbs:.0f} GB/s | {meta['date']}")
    print("\nfused step (ms, median; x = speed-up of the fused kernel)")
    head = f"{'size':28} {'shape':>16} {'fwd eager':>9} {'fwd fused':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'bwd eager':>9} {'bwd fused':>9} {'%copy':>6} {'f+b eager':>9} {'f+b fused':>9} {'x eager':>7}"
    if use_compile:
        head += f" {'f+b compile':>11} {'x compile':>9}"
    print(head)
    for r in step_rows:
        line = (f"{r['size']:28} {r['shape']:>16} {r['fwd_ms_eager']:9.4f} {r['fwd_ms_fused']:9.4f} "
                f"{r['fwd_gbs_fused']:7.0f} {r['fwd_pct_copy']:6.1f} {r['bwd_ms_eager']:9.4f} {r['bwd_ms_fused']:9.4f} "
                f"{r['bwd_pct_copy']:6.1f} {r['fwd_bwd_ms_eager']:9.4f} {r['fwd_bwd_ms_fused']:9.4f} "
                f"{r['fwd_bwd_x_eager']:7.2f}")
        if use_compile:
            line += f" {r['fwd_bwd_ms_compile']:11.4f} {r['fwd_bwd_x_compile']:9.2f}"
        print(line)
    print("\nwhole sampler, mlp encoder (ms, median)")
    print(f"{'K':6} {'shape':>16} {'eager loop':>10} {'fused':>9} {'x eager':>8} {'max |err|':>10}")
    for r in sampler_rows:
        print(f"{r['size']:6} {r['shape']:>16} {r['eager_ms']:10.4f} {r['fused_ms']:9.4f} {r['x_eager']:8.2f} "
              f"{r['max_abs_err']:10.2e}")
    large = step_rows[-1]
    k8 = [r for r in sampler_rows if r["size"] == "K=8"]
    print("\ntargets: fused step >= 80% copy on the large map: fwd {:.0f}%, bwd {:.0f}%; f+b >= 2x eager: {:.2f}x; "
          "whole sampler >= 3x at K=8: {}".format(large["fwd_pct_copy"], large["bwd_pct_copy"],
                                                   large["fwd_bwd_x_eager"],
                                                   f"{k8[0]['x_eager']:.2f}x" if k8 else "n/a"))


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/kernels.py needs a CUDA GPU to time the Triton kernels (GPU numbers: not measured here); "
              "use --smoke to check the script's paths in Triton's interpreter.", file=sys.stderr)
        return 2
    if args.smoke and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float16  # bf16 math is broken in the interpreter
    timer = partial(kernel_ms, device=device, quick=args.quick or args.smoke)  # fn -> median ms
    meta = versions(device)
    meta.update(mode="smoke (interpreter; times meaningless)" if not cuda else ("quick" if args.quick else "full"),
                dtype=str(dtype).split(".")[1])
    use_compile = cuda and not args.no_compile
    copy_gbs = copy_bandwidth(timer, device, not cuda)
    meta["copy_gbs"] = copy_gbs
    sizes = SMOKE_STEP_SIZES if not cuda else ([STEP_SIZES[0], STEP_SIZES[-1]] if args.quick else STEP_SIZES)
    step_rows = bench_step(timer, device, dtype, sizes, use_compile, copy_gbs)
    sampler_rows = bench_sampler(timer, device, dtype, not cuda)
    print_tables(meta, step_rows, sampler_rows, copy_gbs, use_compile)
    out = args.out or (None if not cuda else str(Path(__file__).parent / "results"))
    if out:
        jpath, cpath = write_results(Path(out), meta, step_rows + sampler_rows)
        print(f"\nwrote {jpath} and {cpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
