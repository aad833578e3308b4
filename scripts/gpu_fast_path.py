"""The fast path's GPU checks (issue 20), one PASS/FAIL line each, a table, and OUT/gpu_fast_path.json.

    python scripts/gpu_fast_path.py --out OUT [--only folder,pytest,resume,speed] [--budget 300]

- folder   `fmkt-cli distill --data imagefolder` with 2 workers (pin-memory thread beside the capture) past the
           capture and through a second epoch: exit 0, the step captured, no fallback line.
- pytest   tests/test_capture.py on CUDA: every method x SGD/AdamW x fresh/resumed-from-CPU captured and equal to
           eager, the LR a resumed graph applies read from the weights, a non-finite replay a no-op, bf16.
- resume   SIGKILL of a captured `fmkt-cli distill` right after a mid-epoch checkpoint, then --resume: the same
           epochs as an uninterrupted captured run (losses to 1e-3 relative: CUDA's convolutions are not
           bit-deterministic run to run; the CPU test holds this to the bit).
- speed    the CLI's own images/s (metrics.jsonl, epochs 2+) with the step captured and eager, KD and FM-KT N=8,
           resnet32x4 -> resnet8x4 at batch 128 on digits (8 x 8, held on the GPU): the figure the epoch line prints.

Needs CUDA; every stage has its own time box (a share of --budget). ``--device cpu`` is a dry run of the same
command lines on the CPU (nothing is captured there, so only exit codes and records are checked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"
TIMING = ("epoch_seconds", "images_per_s")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "fmkt.cli", *map(str, args)]


def run(cmd, timeout, **kw):
    env = {**os.environ, "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, exc.stdout or "", (exc.stderr or "") + "\n[timed out]")


def tail(text: str, n: int = 3) -> str:
    """The last ``n`` lines of a command's output that say something (rich's box borders dropped)."""
    lines = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines()]
    return " / ".join([ln for ln in lines if ln][-n:])[:300]


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def was_captured(text: str) -> bool:
    """What the CLI printed says the step was captured and stayed so (always True in a CPU dry run)."""
    return DEVICE == "cpu" or ("captured as one CUDA graph" in text and "could not be captured" not in text)


def stage_folder(work: Path, timeout: float) -> tuple[bool, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from imagefolder_data import make_image_folder

    root = make_image_folder(work / "folder", train_per_class=32, val_per_class=8)
    out = work / "folder-run"
    done = run(cli("distill", "--data", "imagefolder", "--data-dir", root, "--student", "resnet8", "--epochs", 2,
                   "--batch-size", 32, "--set", "data.workers=2", "--set", "data.image_size=32",
                   "--set", "teacher.arch=resnet8",
                   "--set", "teacher.epochs=1", "--set", "method.train_steps=2", "--set", f"train.device={DEVICE}",
                   "--out", out), timeout)
    text = done.stdout + done.stderr
    captured = was_captured(text)
    ok = done.returncode == 0 and captured and len(records(out)) == 2
    return ok, f"exit {done.returncode}, captured {captured}, epochs {len(records(out))}" + ("" if ok else
                                                                                              f": {tail(text)}")


def stage_pytest(work: Path, timeout: float) -> tuple[bool, str]:
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_capture.py",
                "-k", "cuda or bf16 or float_lr"], timeout)
    (work / "pytest.log").write_text(done.stdout + done.stderr)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return done.returncode == 0, last


def stage_resume(work: Path, timeout: float) -> tuple[bool, str]:
    args = ["distill", "--student", "resnet8", "--epochs", 3, "--batch-size", 32, "--eval-steps", "1,2",
            "--set", "data.train_subset=480", "--set", "data.test_subset=96", "--set", "teacher.arch=resnet8",
            "--set", "teacher.epochs=1", "--set", "method.train_steps=2",
            "--set", "train.checkpoint_every_steps=2", "--set", f"train.device={DEVICE}"]
    full = work / "resume-full"
    done = run(cli(*args, "--out", full), timeout / 3)
    if done.returncode != 0 or not was_captured(done.stderr):
        return False, f"uninterrupted run: exit {done.returncode}, {tail(done.stderr)}"
    out = work / "resume-crash"
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.Popen(cli(*args, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=ROOT)
    import torch

    killed, deadline = None, time.monotonic() + timeout / 3
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        try:
            ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            if ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0:
                os.kill(proc.pid, signal.SIGKILL)
                killed = ckpt["step_in_epoch"]
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    if killed is None:
        return False, "no mid-epoch checkpoint of epoch 2 seen before the run ended"
    resumed = run(cli(*args, "--out", out, "--resume"), timeout / 3)
    if resumed.returncode != 0 or not was_captured(resumed.stderr):
        return False, f"resumed run: exit {resumed.returncode}, {tail(resumed.stderr)}"
    a, b = records(full), records(out)
    worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in x
                if k not in TIMING and isinstance(x[k], float))
    ok = len(a) == len(b) == 3 and worst < 1e-3 and [x["lr"] for x in a] == [y["lr"] for y in b]
    return ok, f"killed at epoch 2 step {killed}; worst relative difference {worst:.2e} over {len(b)} epochs"


def stage_speed(work: Path, timeout: float) -> tuple[bool, str, list]:
    rows = []
    for method, extra in (("kd", []), ("fmkt", ["--set", "method.train_steps=8"])):
        for fast in ("on", "off"):
            out = work / f"speed-{method}-{fast}"
            done = run(cli("distill", "--method", method, "--student", "resnet8x4", "--epochs", 4,
                           "--batch-size", 128, "--set", "teacher.arch=resnet32x4", "--set", "teacher.epochs=1",
                           "--set", f"train.fast_path={fast}", "--set", f"train.device={DEVICE}", *extra, "--out", out),
                       timeout / 4)
            ips = [r["images_per_s"] for r in records(out)[1:]]
            rows.append({"method": method, "fast_path": fast, "exit": done.returncode,
                         "images_per_s": round(sum(ips) / len(ips), 1) if ips else None})
    ok = all(r["exit"] == 0 and r["images_per_s"] for r in rows)
    return ok, "; ".join(f"{r['method']} {r['fast_path']}: {r['images_per_s']} img/s" for r in rows), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="folder,pytest,resume,speed")
    ap.add_argument("--budget", type=float, default=360.0, help="seconds for all stages together")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the commands")
    args = ap.parse_args(argv)
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_fast_path: needs a CUDA GPU (or --device cpu for a dry run); stopping.")
        return 2
    out = Path(args.out)
    work = out / "gpu_fast_path_work"
    work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in ("folder", "pytest", "resume", "speed") if s in args.only.split(",")]
    shares = {"folder": 0.15, "pytest": 0.35, "resume": 0.25, "speed": 0.25}
    results, speed_rows = {}, []
    for name in stages:
        t0 = time.perf_counter()
        got = globals()[f"stage_{name}"](work, args.budget * shares[name])
        if name == "speed":
            speed_rows = got[2]
        results[name] = {"pass": got[0], "detail": got[1], "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{'PASS' if got[0] else 'FAIL'} {name}: {got[1]} ({results[name]['seconds']} s)", flush=True)
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {'PASS' if r['pass'] else 'FAIL'} | {r['seconds']} | {r['detail']} |")
    report = {"machine": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
              "device": DEVICE, "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checks": results,
              "speed": speed_rows}
    (out / "gpu_fast_path.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
