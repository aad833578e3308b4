"""data.decode=gpu against the CPU workers on a CUDA machine (scripts/gpu_check.sh's ``decode`` stage).

    python scripts/gpu_decode.py --out OUT                  # on a CUDA machine: OUT/gpu_decode_cuda.json
    python scripts/gpu_decode.py --out /tmp/d --device cpu  # dry run: everything but the CUDA call

Generates ``--images`` ImageNet-sized JPEGs (benchmarks/loader_speed.py's: 500 x 375, quality 90) plus, for the
checks, a CMYK JPEG and a truncated one, then measures on ``--device``:

1. **decode alone**: images/s of ``torchvision.io.decode_jpeg`` on a list of ``--batch`` files on the device (nvjpeg,
   batched) against ``decode_image`` on the CPU, one file at a time on one thread (what one worker does);
2. **the training loader**: fmkt's FolderLoader (RandomResizedCrop 224 + flip, batches of ``--batch`` landing on
   the device), ``data.decode=cpu`` with each of ``--workers`` worker counts against ``data.decode=gpu`` with the
   same workers (which then only read files and parse headers); images/s over two epochs, the first batch left out;
3. **agreement**: the same training batches (same items, same draws) from both paths: the largest and mean
   difference in uint8 levels (nvjpeg's IDCT and CUDA's float resize against libjpeg-turbo and the CPU's uint8
   resize); the decode alone likewise;
4. **bad files on the device**: what the device's decode_jpeg does with a CMYK and a truncated JPEG (raises, or
   decodes: a truncated file nvjpeg decodes silently would be trained on where the CPU path skips it).

``--device cpu`` lifts the refusal of data.decode=gpu without CUDA (fmkt.data.workers.refuse_gpu_decode) and
decodes the "device" batches with decode_jpeg(list, device="cpu"): a dry run of the script, its numbers not the
GPU's. Writes OUT/gpu_decode_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loader_speed import write_folder  # noqa: E402
from fmkt.data import load_dataset, make_loader  # noqa: E402
from fmkt.data import transforms as T  # noqa: E402
from fmkt.data import workers as W  # noqa: E402
from fmkt.runtime import environment  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_alone(paths: list, batch: int, device: torch.device) -> dict:
    """images/s of the batched device decode against the CPU's one file at a time (one thread)."""
    datas = [T.read_bytes(p) for p in paths[:batch]]
    T.decode_jpegs(datas[:4], device)  # warm-up: nvjpeg's handles, CUDA context
    sync(device)
    t = time.perf_counter()
    for _ in range(3):
        out = T.decode_jpegs(datas, device)
    sync(device)
    on_device = 3 * len(datas) / (time.perf_counter() - t)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    cpu = [T.decode_bytes(d) for d in datas]
    on_cpu = len(datas) / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    diffs = [(a.cpu().int() - b.int()).abs() for a, b in zip(out, cpu) if a is not None]
    return {"files": len(datas), "device_batched_images_per_s": round(on_device, 1),
            "cpu_one_thread_images_per_s": round(on_cpu, 1), "device_failed": sum(a is None for a in out),
            "max_abs_diff": max(int(d.max()) for d in diffs), "mean_abs_diff": round(float(
                torch.cat([d.flatten().float() for d in diffs]).mean()), 4)}


def loader_rate(root: Path, decode: str, workers: int, batch: int, device: torch.device) -> dict:
    train, _, info = load_dataset("imagefolder", root, image_size=224, workers=workers, decode=decode)
    loader = make_loader(train, batch, shuffle=True, augment_info=info, drop_last=True, device=device)
    images, t0 = 0, None
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            if t0 is None:  # the first batch pays the workers' start-up
                sync(device)
                t0 = time.perf_counter()
                continue
            images += len(y)
    sync(device)
    seconds = time.perf_counter() - t0
    loader.close()
    return {"decode": decode, "workers": workers, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1)}


def agreement(root: Path, batch: int, device: torch.device) -> dict:
    """The first training batch of epoch 0 from both paths: same items, differences in uint8 levels."""
    got = {}
    for decode in ("cpu", "gpu"):
        train, _, info = load_dataset("imagefolder", root, image_size=224, workers=0, decode=decode)
        x, y = next(iter(make_loader(train, batch, shuffle=True, augment_info=info, drop_last=True, device=device)))
        got[decode] = ((x * 255).round().cpu(), y.cpu())
    diff = (got["gpu"][0] - got["cpu"][0]).abs()
    return {"same_labels": bool(torch.equal(got["gpu"][1], got["cpu"][1])), "max_abs_diff": int(diff.max()),
            "mean_abs_diff": round(float(diff.mean()), 4), "share_of_pixels_differing": round(float(
                (diff > 0).float().mean()), 4)}


def bad_files(folder: Path, good: str, device: torch.device) -> dict:
    """What the device's decode_jpeg does with a CMYK JPEG and with a truncated one (and what the CPU does)."""
    from PIL import Image

    Image.open(good).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    data = Path(good).read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    out = {}
    for name in ("cmyk.jpg", "cut.jpg"):
        raw = T.read_bytes(str(folder / name))
        out[name] = {"header_size": T.jpeg_size(raw)}
        for where, fn in [("device", lambda: T.decode_jpegs([raw], device)[0]), ("cpu", lambda: T.decode_bytes(raw))]:
            try:
                image = fn()
                out[name][where] = "failed (None)" if image is None else f"decoded {tuple(image.shape)}"
            except Exception as exc:  # what each decoder does is the measurement
                out[name][where] = f"raised {T.describe_error(exc)}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", default="", help="worker counts (default: 2 and this host's CPUs, at most 16)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_decode: --device cuda needs CUDA (use --device cpu for a dry run)")
        return 2
    if device.type == "cpu":  # the dry run: data.decode=gpu's byte path with decode_jpeg(list, device="cpu")
        W.refuse_gpu_decode = lambda device: None
    cpus = len(os.sched_getaffinity(0))
    counts = [int(w) for w in args.workers.split(",") if w] or sorted({min(2, cpus), min(16, cpus)})
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "big", args.images, (500, 375))
        train, _, _ = load_dataset("imagefolder", root, image_size=224)
        paths = [train.path(i) for i in range(len(train))]
        result = {"benchmark": "gpu_decode", "device": str(device), "dry_run": device.type == "cpu",
                  "environment": environment(str(device)), "images": args.images, "batch": args.batch,
                  "decode_alone": decode_alone(paths, args.batch, device),
                  "agreement_first_batch": agreement(root, args.batch, device),
                  "bad_files": bad_files(Path(tmp), paths[0], device),
                  "loader_224": [loader_rate(root, d, w, args.batch, device) for w in counts for d in ("cpu", "gpu")]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_decode_{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
