"""Latency of FM-KT students per K, backend and precision (what `fmkt-cli bench` measures), for BENCHMARKS.md.

    python benchmarks/latency.py                    # CPU: ~6-8 minutes on 2 cores
    python benchmarks/latency.py --device cuda      # GPU (scripts/gpu_check.sh runs it with --quick)
    python benchmarks/latency.py --quick            # fewer calls, K in {0, 1, 4}, compiled pass at K=4 only

Students:
1. ``default``: the artifact of the default ``fmkt-cli distill`` (digits 1x8x8, resnet8, FM-KT DIST, conv encoder,
   N=8): ``runs/distill/artifact``, made with that command when absent (``--artifact`` points elsewhere).
2. ``resnet8x4``: a CIFAR-shaped FM-KT^Theta student (3x32x32, 100 classes, conv encoder, rectified flow), random
   weights: latency only (no accuracy).
Per student, pass 1 times the backends that need no compile at every K (CPU: eager, onnxruntime; CUDA: eager,
cudagraph, onnxruntime, trt; fp32, and fp16 on CUDA); pass 2 (``_compiled``) times torch.compile and AOTInductor at
the student alone and K=4 (each compiles once per K and batch). Files: OUT/latency_<device>_<student>[_compiled]
.{json,csv,png} and OUT/latency_<device>_<student>.md (the tables and the target checks). Timing: run_bench's harness
(fmkt.bench.timing); machine and versions: fmkt.runtime.environment, as in every bench JSON.
Targets are checked and printed (measured / not measured), never asserted:
- K-step overhead: FM-KT at K=4 <= 1.3x the student alone at batch 1 and 64 on the same backend; theta (K=0) 1.0x;
- ONNX Runtime on the CPU >= 1.5x faster than eager at batch 1 for K=4;
- on a GPU: TensorRT FP16 >= 3x eager FP32 at batch 1 (K=4).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import find_row, machine_slug, synthetic_artifact, write_json  # noqa: E402
from fmkt.artifact import is_artifact  # noqa: E402
from fmkt.bench import BenchSettings, markdown_table, run_bench  # noqa: E402
from fmkt.runtime import environment  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--artifact", default=str(ROOT / "runs" / "distill" / "artifact"),
                    help="the default distill artifact (made with `fmkt-cli distill` when absent)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-latency"), help="folder for the resnet8x4 artifact")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile / AOTInductor pass")
    ap.add_argument("--only", choices=["default", "resnet8x4"], default=None)
    return ap.parse_args(argv)


def resnet8x4_artifact(folder: Path) -> Path:
    """The CIFAR-shaped FM-KT^Theta student (conv encoder, random weights), made once under ``folder``."""
    return synthetic_artifact(folder / "resnet8x4-theta", "resnet8x4", "conv", reuse=True)


def default_artifact(path: Path) -> Path:
    if not is_artifact(path):
        print(f"{path} is absent: running the default `fmkt-cli distill --out {path.parent}` first", flush=True)
        subprocess.run([sys.executable, "-m", "fmkt.cli", "distill", "--out", str(path.parent)], check=True)
    return path


def passes(device: str, quick: bool, compiled: bool) -> list[tuple[str, BenchSettings]]:
    cuda = device == "cuda"
    fast = ["eager", "cudagraph", "onnxruntime", "trt"] if cuda else ["eager", "onnxruntime"]
    steps = [0, 1, 4] if quick else [0, 1, 2, 4, 8]
    iters, warmup = (200, 20) if cuda else (100, 10)
    if quick:
        iters, warmup = (100, 10) if cuda else (30, 5)
    precisions = ["fp32", "fp16"] if cuda else ["fp32"]
    out = [("", BenchSettings(backends=fast, batches=[1, 64], steps=steps, precisions=precisions, device=device,
                              warmup=warmup, iters=iters))]
    if compiled:
        out.append(("_compiled", BenchSettings(backends=["compile", "aoti"], batches=[1, 64], steps=[4],
                                               precisions=["fp32"], device=device, warmup=warmup, iters=iters)))
    return out


def targets(rows, device: str) -> list[str]:
    """Each target, with the numbers it rests on, or 'not measured' and why."""
    lines = []
    backends = sorted({r.backend for r in rows if r.status == "ok"})
    for backend in backends:
        for batch in (1, 64):
            r = find_row(rows, backend=backend, precision="fp32", batch=batch, variant="4")
            if r is not None and r.status == "ok" and r.x_student:
                lines.append(f"K=4 overhead, {backend} fp32, batch {batch}: {r.x_student:.2f}x the student alone "
                             f"(target <= 1.3x: {'met' if r.x_student <= 1.3 else 'NOT met'})")
            t = find_row(rows, backend=backend, precision="fp32", batch=batch, variant="0")
            if t is not None and t.status == "ok" and t.x_student:
                lines.append(f"theta (K=0) overhead, {backend} fp32, batch {batch}: {t.x_student:.2f}x (target 1.0x)")
    def speedup(slow, fast, what, target):
        if slow and fast and slow.status == fast.status == "ok":
            ratio = slow.p50_ms / fast.p50_ms
            lines.append(f"{what}: {ratio:.2f}x (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
            return True
        return False

    eager4 = find_row(rows, backend="eager", precision="fp32", batch=1, variant="4")
    if device == "cpu":
        ort4 = find_row(rows, backend="onnxruntime", precision="fp32", batch=1, variant="4")
        speedup(eager4, ort4, "ONNX Runtime CPU vs eager, K=4, batch 1", 1.5)
    else:
        trt = find_row(rows, backend="trt", precision="fp16", batch=1, variant="4")
        if not speedup(eager4, trt, "TensorRT FP16 vs eager FP32, K=4, batch 1", 3):
            why = trt.reason if trt is not None and trt.status != "ok" else "not run"
            lines.append(f"TensorRT FP16 vs eager FP32: not measured ({why})")
            graph = find_row(rows, backend="cudagraph", precision="fp16", batch=1, variant="4")
            if eager4 and graph and eager4.status == graph.status == "ok":
                lines.append(f"(for scale) CUDA-graph FP16 vs eager FP32, K=4, batch 1: "
                             f"{eager4.p50_ms / graph.p50_ms:.2f}x")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("latency.py --device cuda: no CUDA GPU is visible; stopping.")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = machine_slug(args.device, environment(torch.device(args.device))["machine"], with_device=True)
    students = []
    if args.only in (None, "default"):
        students.append(("default", default_artifact(Path(args.artifact))))
    if args.only in (None, "resnet8x4"):
        students.append(("resnet8x4", resnet8x4_artifact(Path(args.work))))
    for name, path in students:
        md = [f"# Latency on {slug.removeprefix(args.device + '-')} ({time.strftime('%Y-%m-%d')})", ""]
        summary = {}
        all_rows = []
        for suffix, settings in passes(args.device, args.quick, not args.no_compiled):
            settings.out = out / f"latency_{slug}_{name}{suffix}.json"
            print(f"\n== {name}{suffix}: {path}", flush=True)
            res = run_bench(path, settings)
            all_rows += res.rows
            table = markdown_table(res.rows, cuda=args.device == "cuda")
            print(table, flush=True)
            md += [f"## {name}{suffix} ({res.info['model'].get('arch')}, {res.info['model'].get('input')}): "
                   f"{settings.warmup} warm-up + {settings.iters} timed calls, {res.seconds:.0f} s "
                   f"(estimated {res.estimate_s:.0f} s)", "",
                   f"Command: `fmkt-cli bench {path} --backends {','.join(settings.backends)} --batch 1,64 "
                   f"--steps {','.join(map(str, settings.steps))} --precision {','.join(settings.precisions)} "
                   f"--device {args.device} --warmup {settings.warmup} --iters {settings.iters}`", "", table, ""]
            summary.setdefault(name, {})[suffix or "main"] = {"files": res.files, "versions": res.info["versions"],
                                                              "machine": res.info["machine"]}
        checks = targets(all_rows, args.device)
        summary[name]["targets"] = checks
        md += [f"### targets ({name})", ""] + [f"- {c}" for c in checks] + [""]
        print("\n".join(["", f"targets ({name}):"] + [f"  {c}" for c in checks]), flush=True)
        (out / f"latency_{slug}_{name}.md").write_text("\n".join(md) + "\n")
        write_json(out / f"latency_{slug}_{name}_summary.json", summary)
    print(f"\nwrote {out}/latency_{slug}*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
