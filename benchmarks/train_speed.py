"""Training speed: images/s of one training step per method, eager against the fast path, as the engine runs them.

    python benchmarks/train_speed.py --device cuda --out DIR      # the GPU table (~2-3 minutes on an H100)
    python benchmarks/train_speed.py --device cpu --out DIR       # CPU rows (2 cores: ~2 minutes)
    python benchmarks/train_speed.py --device cuda --imagenet     # resnet34 -> resnet18, 224 x 224, batch 256

Setting (issue 14's): resnet32x4 teacher -> resnet8x4 student, Fashion-MNIST-shaped data (1 x 28 x 28, 10 classes,
random images in memory, the dataset's crop augmentation), SGD (Nesterov) with the per-iteration cosine LR, bf16
autocast on CUDA. Methods none, kd, dist, fmkt (DIST, conv, rectified, N = 8) and theta; paths ``eager`` (the
engine's step with the data on the host, as before the fast path) and ``fast`` (data on the GPU, the step captured
as one CUDA graph: fmkt.capture); kernel torch and triton for the flow methods on CUDA; batch 128 and 512.
``--imagenet`` (issue 16): the paper's ImageNet pair, resnet34 -> resnet18 at 3 x 224 x 224 with 1000 classes,
batch 256, methods none, kd and fmkt, no augmentation in the step (an image folder's workers deliver the batches
ready: benchmarks/loader_speed.py measures them); writes train_speed_<device>_imagenet.json.
Each row times ``fmkt.engine.prepare(cfg).step``, the step the engine itself chose (fmkt.capture.make_step: eager,
or captured where the method and optimiser allow it) on the run's own loader, with the random images registered as
a dataset (benchmarks/_common.synthetic_dataset): warm-up steps (the capture included), then timed steps, wall
clock with the GPU synchronised (bench.timing, the one harness).
FLOPs per step are counted once per method (torch.utils.flop_counter on an eager step: forward and backward), so
TFLOP/s = FLOPs / step time, next to the GPU's dense bf16 peak. Prints a table, writes OUT/train_speed_<device>.json
and .csv with the machine and versions (fmkt.runtime.environment).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import find_row, machine_slug, synthetic_dataset, write_csv, write_json  # noqa: E402
from fmkt.bench.timing import time_callable  # noqa: E402
from fmkt.capture import CapturedStep, capture_refusal  # noqa: E402
from fmkt.config import Config  # noqa: E402
from fmkt.data import dataset_info  # noqa: E402
from fmkt.data.folder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fmkt.data.tensors import DatasetInfo  # noqa: E402
from fmkt.distillers import METHODS  # noqa: E402
from fmkt.engine import prepare  # noqa: E402
from fmkt.optim import graph_refusal  # noqa: E402
from fmkt.runtime import environment  # noqa: E402
from fmkt.student import StudentSpec, build_student  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, NVIDIA's data sheets (SXM)
# every registered method but two whose step costs what a timed one costs (issue 14's list: none, kd, dist, fmkt,
# theta); a newly registered method is timed without touching this file
LEFT_OUT = {"dkd": "a KD step with another loss", "ofmkt": "an FM-KT step without the teacher's forward"}
METHOD_ROWS = [m for m in METHODS if m not in LEFT_OUT]


@dataclass(frozen=True)
class Setting:
    """The models and data shape a table is measured on."""
    name: str
    teacher: str
    student: str
    channels: int
    size: int
    classes: int
    augment: bool  # the dataset's crop augmentation in the step's loader (False: a worker-decoded folder's batches)
    batches: tuple
    methods: tuple | None = None  # None: METHOD_ROWS


SETTINGS = {
    "default": Setting("resnet32x4 -> resnet8x4, 1x28x28, 10 classes", "resnet32x4", "resnet8x4", 1, 28, 10,
                       True, (128, 512)),
    "small": Setting("resnet8 -> resnet8 (smoke), 1x28x28, 10 classes", "resnet8", "resnet8", 1, 28, 10, True,
                     (128, 512)),
    # issue 16: the paper's ImageNet pair at the field's batch; the folder loader delivers the batches (no augment here)
    "imagenet": Setting("resnet34 -> resnet18, 3x224x224, 1000 classes", "resnet34", "resnet18", 3, 224, 1000,
                        False, (256,), ("none", "kd", "fmkt")),
}
CSV_FIELDS = ["method", "path", "kernel", "batch", "ms_per_step", "images_per_s", "tflops", "peak_bf16_tflops",
              "captured", "note"]
DATA_BATCHES = 4  # distinct batches held (cycled): ImageNet-shaped data for every timed step would be GBs


def data_info(st: Setting) -> DatasetInfo:
    """The facts of the setting's images: Fashion-MNIST's (statistics, crop augmentation) at 1 x 28 x 28, else
    ImageNet's statistics and no augmentation."""
    if st.channels == 1:
        return replace(dataset_info("fashion-mnist"), num_classes=st.classes, image_size=(st.size, st.size))
    return DatasetInfo("imagenet-shaped", st.classes, st.channels, (st.size, st.size), IMAGENET_MEAN, IMAGENET_STD,
                       0, False)


def config(method: str, batch: int, device, kernel: str, steps: int, fast: bool, st: Setting, out: str) -> Config:
    """The run a row times: the setting's models and random images in memory (``batch * min(steps, DATA_BATCHES)``
    of them), the method with DIST and N = 8, SGD at lr 0.05 with the cosine schedule over one epoch; the fast path
    on (data on the GPU, the step captured where the method allows it) or off."""
    cfg = Config(student=st.student, out=out)
    cfg.data.name = synthetic_dataset(data_info(st), batch * min(steps, DATA_BATCHES))
    cfg.data.batch_size, cfg.data.augment = batch, st.augment
    cfg.method.name, cfg.method.loss, cfg.method.train_steps = method, "dist", "8"
    cfg.optim.lr, cfg.train.epochs, cfg.train.seed = 0.05, 1, 0
    cfg.train.device, cfg.train.kernel, cfg.train.fast_path = str(device), kernel, "on" if fast else "off"
    return cfg


@contextmanager
def prepared(method: str, batch: int, device, kernel: str, steps: int, fast: bool, st: Setting):
    """``engine.prepare``'s Run of a row (its loader, optimiser and step: the engine's own choice of the eager or
    the captured step), in a temporary output folder."""
    with tempfile.TemporaryDirectory(prefix="fmkt-train-speed-") as tmp:
        cfg = config(method, batch, device, kernel, steps, fast, st, str(Path(tmp) / "run"))
        info = data_info(st)
        torch.manual_seed(0)
        teacher = build_student(StudentSpec(arch=st.teacher, num_classes=st.classes, channels=st.channels,
                                            size=(st.size, st.size), mean=info.mean, std=info.std)).eval() \
            if METHODS[method].needs_teacher else None
        run = prepare(cfg, teacher, None, False, Console(quiet=True), None)
        try:
            yield run
        finally:
            run.logger.close()


def cycle(loader):
    """The loader's batches, epoch after epoch (a fresh permutation each)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def row(method, path, kernel, batch, device, warmup, iters, st: Setting) -> dict:
    """One table row: ``engine.prepare(cfg).step`` timed (fmkt.bench.timing) on the run's own loader."""
    fast = path == "fast"
    with prepared(method, batch, device, kernel, warmup + iters, fast, st) as run:
        step, batches = run.step, cycle(run.loader)

        def one():
            images, labels = next(batches)
            losses = step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), 0.0)
            # the harness reads every step's losses (a device sync: per-step timing); the engine reads them at ~2 Hz
            return [float(v.detach()) for v in losses.values()]

        try:
            times = time_callable(one, device, warmup=warmup, iters=iters)
        except Exception as exc:  # a path that breaks here is a row with the reason, not a dead benchmark
            return {"method": method, "path": path, "kernel": kernel, "batch": batch, "ms_per_step": None,
                    "images_per_s": None, "captured": False, "note": f"failed: {type(exc).__name__}: {exc}"[:300]}
        ms = statistics.median(times)
        failed = getattr(step, "failed", None)
        captured = isinstance(step, CapturedStep) and not failed
        refusal = (capture_refusal(run.cfg, device, 1, METHODS[method]) or graph_refusal(run.optimizer)) \
            if fast and not isinstance(step, CapturedStep) else None
    note = refusal or (f"capture failed, eager: {failed}" if failed else None)
    return {"method": method, "path": path, "kernel": kernel, "batch": batch, "ms_per_step": round(ms, 3),
            "images_per_s": round(1e3 * batch / ms, 1), "captured": captured, **({"note": note} if note else {})}


def flops_per_step(method: str, batch: int, device, st: Setting) -> float:
    """FLOPs of one eager step of the method (forward and backward: torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with prepared(method, batch, device, "torch", 1, False, st) as run:
        images, labels = next(iter(run.loader))
        with FlopCounterMode(display=False) as counter:
            run.step(images.to(device), labels.to(device), 0.0)
    return float(counter.get_total_flops())


def plan(device, quick: bool, st: Setting):
    paths = ["eager", "fast"] if device.type == "cuda" else ["eager"]
    batches = st.batches[:1] if quick else st.batches
    for batch in batches:
        for method in st.methods or METHOD_ROWS:
            kernels = ["torch", "triton"] if device.type == "cuda" and METHODS[method].flow else ["torch"]
            for kernel in kernels:
                for path in paths:
                    yield method, path, kernel, batch


def summarise(rows: list[dict]) -> dict:
    """Ratios the issue asks for, measured side by side in this run."""
    def ips(method, path, batch, kernel="torch"):
        r = find_row(rows, method=method, path=path, batch=batch, kernel=kernel,
                     **({"captured": True} if path == "fast" else {}))
        return r["images_per_s"] if r else None

    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        fmkt_e, fmkt_f, kd_e, kd_f = ips("fmkt", "eager", batch), ips("fmkt", "fast", batch), \
            ips("kd", "eager", batch), ips("kd", "fast", batch)
        s = {"fmkt_step_over_kd_step_eager": kd_e / fmkt_e if fmkt_e and kd_e else None}
        if fmkt_f:
            s.update(fmkt_fast_over_eager=fmkt_f / fmkt_e, kd_fast_over_eager=kd_f / kd_e if kd_f else None,
                     fmkt_step_over_kd_step_fast=kd_f / fmkt_f if kd_f else None)
        out[str(batch)] = {k: None if v is None else round(v, 3) for k, v in s.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the setting's first batch size only")
    ap.add_argument("--small", action="store_true", help="resnet8 models (a CPU smoke run, not the issue's setting)")
    ap.add_argument("--imagenet", action="store_true", help="resnet34 -> resnet18 at 224 x 224, batch 256 (issue 16)")
    ap.add_argument("--batch", default=None, help="comma list: other batch sizes than the setting's (e.g. a smoke run)")
    args = ap.parse_args(argv)
    st = SETTINGS["imagenet" if args.imagenet else "small" if args.small else "default"]
    if args.batch:
        st = replace(st, batches=tuple(int(b) for b in args.batch.split(",")))
    device = torch.device(args.device)
    env = environment(device)
    gpu = env["machine"].get("gpu") or ""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    flops = {(m, b): flops_per_step(m, b, device, st) for m in st.methods or METHOD_ROWS
             for b in (st.batches[:1] if args.quick else st.batches)}
    rows = []
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = machine_slug(device, env["machine"]) + ("_imagenet" if args.imagenet else "")
    for method, path, kernel, batch in plan(device, args.quick, st):
        r = row(method, path, kernel, batch, device, args.warmup, args.iters, st)
        r["peak_bf16_tflops"] = peak
        rows.append(r)
        if r["ms_per_step"] is None:
            print(f"{method:6s} {path:5s} {kernel:6s} batch {batch:4d}: {r['note']}", flush=True)
            continue
        r["tflops"] = round(flops[(method, batch)] / (r["ms_per_step"] * 1e-3) / 1e12, 2)
        print(f"{method:6s} {path:5s} {kernel:6s} batch {batch:4d}: {r['images_per_s']:9.1f} img/s  "
              f"{r['ms_per_step']:8.3f} ms/step  {r['tflops']:7.2f} TFLOP/s" + (f" of {peak}" if peak else "")
              + (f"  ({r['note']})" if r.get("note") else ""), flush=True)
        write(out, slug, rows, env, args, device, t0, st)  # after every row: a cut-off run keeps what it measured
    result = write(out, slug, rows, env, args, device, t0, st)
    print("ratios:", json.dumps(result["ratios"]))
    return 0


def write(out: Path, slug: str, rows: list, env: dict, args, device, t0: float, st: Setting) -> dict:
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": env,
              "setting": st.name + ", SGD Nesterov + cosine, " + ("bf16 autocast" if device.type == "cuda" else
                                                                   "fp32"),
              "warmup": args.warmup, "iters": args.iters, "seconds": round(time.perf_counter() - t0, 1),
              "rows": rows, "ratios": summarise(rows)}
    write_json(out / f"train_speed_{slug}.json", result)
    write_csv(out / f"train_speed_{slug}.csv", rows, CSV_FIELDS)
    return result


if __name__ == "__main__":
    sys.exit(main())
