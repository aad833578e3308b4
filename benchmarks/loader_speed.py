"""The image-folder loader on this machine's CPU: images/s per worker, resident memory, and what a GPU needs.

    python benchmarks/loader_speed.py --out benchmarks/results          # ~2-3 minutes on 2 cores
    python benchmarks/loader_speed.py --workers 1,4,8,16 --images 2000 --rss-sizes "" --name gpu-host  # 16 cores

1. **Speed**: ``--images`` generated JPEGs of ImageNet's typical size (500 x 375, quality 90, smooth content plus
   noise, ~60-90 KB each) in the ImageNet layout; fmkt's FolderLoader (the training loader: decode with
   torchvision.io, RandomResizedCrop to 224 x 224 + flip with torchvision's ops, uint8 batches of 64) with
   ``--workers`` DataLoader workers (default 1 and 2), two epochs, the first batch (worker start-up) left out; and
   the same work in this process, one thread, split into decode and crop + resize (after one image's warm-up: the
   decoders' lazy imports are not timed). Also the evaluation transform (resize to 256 + centre crop 224).
2. **Resident memory**: one epoch with 2 workers over folders of ``--rss-sizes`` small files (64 x 48 JPEGs,
   decoded at 32 x 32), each in a fresh process; RSS and PSS (proportional: shared pages split among processes)
   of the main process and of the workers, sampled every 20 ms, the peak reported. Flat in the number of files:
   only the list of (path, class) is in memory.
3. **What a GPU needs (computed, not measured)**: FLOPs of one training image of resnet18 at 224 x 224 (forward +
   backward, torch.utils.flop_counter on the zoo's resnet18), alone and with a resnet34 teacher's forward (KD);
   the GPU's rate = the sustained TFLOP/s measured in BENCHMARKS.md "Fast training" (H100, bf16, batch 512, fast
   path) / FLOPs per image; workers needed = that rate / the measured images/s per worker.

Writes OUT/loader_speed_<name>.json (default cpu) with the machine (fmkt.runtime.environment) and the load average
around the run (other processes on the machine slow the workers down: the numbers are for the machine as it was).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_slug, write_json  # noqa: E402
from fmkt.data import load_dataset, make_loader  # noqa: E402
from fmkt.data import transforms as T  # noqa: E402
from fmkt.runtime import environment  # noqa: E402

# Sustained training TFLOP/s measured on an H100 (bf16, fast path), BENCHMARKS.md "Fast training" (issue 14)
MEASURED_TFLOPS = {"none, batch 512, fast (resnet8x4, CE)": 33.1, "kd, batch 512, fast (resnet32x4 -> resnet8x4)": 62.9}


def write_folder(root: Path, count: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` (w, h) in ROOT/{train,val}/CLASS (val: one per class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in [("train", count), ("val", classes)]:
        for i in range(n):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            f = rng.uniform(0.005, 0.05, 6)
            base = np.stack([np.sin(xx * f[c] + yy * f[c + 3]) for c in range(3)], -1) * 90 + 128
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def loader_rate(root: Path, workers: int, batch: int, epochs: int = 2) -> dict:
    train, _, info = load_dataset("imagefolder", root, image_size=224, workers=workers)
    loader = make_loader(train, batch, shuffle=True, augment_info=info, drop_last=True)
    images, t0 = 0, None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            if t0 is None:  # the first batch pays the workers' start-up
                t0 = time.perf_counter()
                continue
            images += len(y)
    seconds = time.perf_counter() - t0
    loader.close()
    return {"workers": workers, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), "images_per_s_per_worker": round(images / seconds / workers, 1)}


def in_process(root: Path, count: int) -> dict:
    """ms per image of decoding and of each transform in this process, one thread."""
    torch.set_num_threads(1)
    train, _, _ = load_dataset("imagefolder", root, image_size=224)
    paths = [train.path(i) for i in range(min(count, len(train)))]
    T.train_crop(T.decode_rgb(paths[-1]), 224, T.item_rng(1, 0, 0))  # warm-up: lazy imports and first-call setup
    T.eval_crop(T.decode_rgb(paths[-1]), 224)
    t = time.perf_counter()
    decoded = [T.decode_rgb(p) for p in paths]
    decode = (time.perf_counter() - t) / len(paths)
    t = time.perf_counter()
    for i, chw in enumerate(decoded):
        T.train_crop(chw, 224, T.item_rng(0, 0, i))
    crop = (time.perf_counter() - t) / len(paths)
    t = time.perf_counter()
    for chw in decoded:
        T.eval_crop(chw, 224)
    ev = (time.perf_counter() - t) / len(paths)
    kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    return {"images": len(paths), "mean_file_kb": round(kb, 1), "decode_ms": round(1e3 * decode, 2),
            "train_crop_ms": round(1e3 * crop, 2), "eval_crop_ms": round(1e3 * ev, 2),
            "train_images_per_s_one_core": round(1 / (decode + crop), 1),
            "eval_images_per_s_one_core": round(1 / (decode + ev), 1)}


def _kb(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def rss_child(root: str) -> dict:
    """One epoch with 2 workers over ``root`` (32 x 32 crops), the peak memory of this process and its workers."""
    me, peak, stop = os.getpid(), {"main_rss_mb": 0.0, "main_pss_mb": 0.0, "worker_rss_mb": 0.0,
                                   "worker_pss_mb": 0.0, "total_pss_mb": 0.0}, threading.Event()

    def sample():
        while not stop.is_set():
            kids = _children(me)
            now = {"main_rss_mb": _kb(me, "status", "VmRSS") / 1024,
                   "main_pss_mb": _kb(me, "smaps_rollup", "Pss") / 1024,
                   "worker_rss_mb": max([_kb(k, "status", "VmRSS") / 1024 for k in kids], default=0.0),
                   "worker_pss_mb": max([_kb(k, "smaps_rollup", "Pss") / 1024 for k in kids], default=0.0)}
            now["total_pss_mb"] = now["main_pss_mb"] + sum(_kb(k, "smaps_rollup", "Pss") / 1024 for k in kids)
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    train, _, info = load_dataset("imagefolder", root, image_size=32, workers=2)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, seen = time.perf_counter(), 0
    for x, y in make_loader(train, 64, shuffle=True, augment_info=info, drop_last=True):
        seen += len(y)
    stop.set()
    thread.join()
    return {"files": len(train), "images_seen": seen, "seconds": round(time.perf_counter() - t0, 2),
            **{k: round(v, 1) for k, v in peak.items()}}


def resnet18_flops() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from fmkt.models import create_model

    counts = {}
    for arch in ("resnet18", "resnet34"):
        model = create_model(arch, num_classes=1000, in_channels=3)
        x = torch.randn(1, 3, 224, 224)
        with FlopCounterMode(display=False) as fwd:
            out = model(x)
        with FlopCounterMode(display=False) as bwd:
            out.sum().backward()
        counts[arch] = {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops()}
    return counts


def gpu_need(flops: dict, per_worker: float, per_core: float) -> dict:
    """The GPU's images/s (computed) and the workers that feed it: at the loader's measured rate per worker, and
    at the in-process rate of one core (decode + crop alone: what a worker on an otherwise idle core approaches)."""
    student = flops["resnet18"]["forward"] + flops["resnet18"]["backward"]
    kd = student + flops["resnet34"]["forward"]
    rows = {}
    for what, per_image in [("resnet18 alone (CE)", student), ("resnet34 -> resnet18 (KD: + teacher forward)", kd)]:
        for source, tflops in MEASURED_TFLOPS.items():
            rate = tflops * 1e12 / per_image
            rows[f"{what} at {tflops} TFLOP/s ({source})"] = {
                "gflops_per_image": round(per_image / 1e9, 2), "images_per_s": round(rate),
                "batch_256_step_ms": round(256 / rate * 1e3, 1), "workers_needed": int(np.ceil(rate / per_worker)),
                "workers_needed_at_one_core_rate": int(np.ceil(rate / per_core))}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--images", type=int, default=640, help="ImageNet-sized JPEGs for the speed rows")
    ap.add_argument("--rss-sizes", default="2000,8000", help="folder sizes for the memory rows ('' : none)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the speed rows (e.g. 1,4,8,16 on a GPU host)")
    ap.add_argument("--name", default=None, help="the output file is OUT/loader_speed_<name>.json (default: cpu)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child)))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        big = write_folder(Path(tmp) / "big", args.images, (500, 375))
        speed = [loader_rate(big, w, 64) for w in map(int, args.workers.split(","))]
        cost = in_process(big, 160)
        memory = []
        for n in [int(x) for x in args.rss_sizes.split(",") if x]:
            small = write_folder(Path(tmp) / f"small{n}", n, (64, 48), seed=n)
            run = subprocess.run([sys.executable, __file__, "--rss-child", str(small)], capture_output=True,
                                 text=True, check=True)
            memory.append(json.loads(run.stdout.strip().splitlines()[-1]))
    per_worker = speed[0]["images_per_s_per_worker"]
    result = {"benchmark": "loader_speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "environment": environment("cpu"), "load_average_before_after": [load_before, os.getloadavg()],
              "speed_224": speed, "in_process_one_thread": cost, "resident_memory": memory,
              "flops_224": resnet18_flops(), "gpu_need_computed": None}
    result["gpu_need_computed"] = gpu_need(result["flops_224"], per_worker, cost["train_images_per_s_one_core"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or machine_slug("cpu", result["environment"]["machine"])  # the host's CPU loader: "cpu"
    write_json(out / f"loader_speed_{name}.json", result)
    print(json.dumps({k: result[k] for k in ("load_average_before_after", "speed_224", "in_process_one_thread",
                                              "resident_memory", "gpu_need_computed")}, indent=2))


if __name__ == "__main__":
    main()
