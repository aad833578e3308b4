"""Detection on the Fashion-MNIST canvases: the student alone vs PKD vs FM-KT, COCO mAP over seeds, and latency.

    python benchmarks/detection_accuracy.py                     # the CPU protocol (~2 h on 2 cores), labelled
    python benchmarks/detection_accuracy.py --jobs 4 --device cuda --epochs 12   # a GPU's protocol
    python benchmarks/detection_accuracy.py --report-only       # the table of the runs saved in the JSON

The CPU protocol (what 2 cores afford; not a converged number): the default canvases of ``fmkt-cli
make-detection-data`` (500 train / 100 val, 128 x 128, seed 0); student ``fasterrcnn_resnet18_fpn`` from scratch
with fewer proposals and RoI samples (:data:`KWARGS`);
one teacher, the same architecture trained once for ``--teacher-epochs`` (seed 0) and given to every run with
``--teacher``; each row for ``--epochs`` at SGD lr 0.01 (cosine), batch 8, clip 2.5 (every row the same
recipe: only the method differs), seeds 1-3 (not 0: a student seeded as the teacher starts from the teacher's own
initial weights, and the teacher's trained weights still point the same way, cosine 0.999-1.0). Rows: ``none``
(the student alone), ``pkd`` (mmrazor's PKD on the FPN levels, weights 6), ``fmkt`` (the flow on each FPN level,
the authors' weights [6, 6, 6, 6, 0], PKD as D, N = 8 in training, K = 4 refinement steps at inference; encoder
dwconv, as the COCO recipes), ``fmkt_aux`` (the same flow with ``detection.refine=false``: a training-only loss,
the plain detector deployed), ``fmkt_detach`` (``fmkt`` with N drawn from {1, 2, 4, 8, 16}, as the COCO recipes, and
``detection.detach_target=true``: no gradient into the student's map through the target velocity), ``pkd_w1``,
``fmkt_w1`` and ``fmkt_detach_w1`` (``pkd``, ``fmkt`` with N drawn from {1, 2, 4, 8, 16}, and ``fmkt_detach`` at
weight 1 on the four levels instead of the published 6). Each run is the CLI's own (``fmkt-cli train`` /
``distill`` in a child process, one thread each, ``--jobs`` at once); each finished run is saved at once, a rerun
skips what the JSON holds. Latency:
``fmkt-cli bench`` on the first seed's FM-KT artifact with ``--teacher`` (eager and onnxruntime, batch 1): the detector
alone (the ``none`` and ``pkd`` students are that architecture), FM-KT at K = 4, and the teacher.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_slug, write_json  # noqa: E402

FLOW = ["--set", "method.encoder=dwconv"]  # the COCO recipes' encoder
DRAWN, DETACH = ["--set", "method.train_steps=1,2,4,8,16"], ["--set", "detection.detach_target=true"]
W1 = ["--set", "detection.weights=[1,1,1,1,0]"]  # the published weights are for ImageNet-started detectors
ROWS = {"none": ("none", []), "pkd": ("pkd", []),  # row -> (method, its options): one recipe, only the method differs
        "fmkt": ("fmkt", FLOW), "fmkt_aux": ("fmkt", [*FLOW, "--set", "detection.refine=false"]),
        "fmkt_detach": ("fmkt", [*FLOW, *DRAWN, *DETACH]), "pkd_w1": ("pkd", W1),
        "fmkt_w1": ("fmkt", [*FLOW, *DRAWN, *W1]), "fmkt_detach_w1": ("fmkt", [*FLOW, *DRAWN, *DETACH, *W1])}
STUDENT = "fasterrcnn_resnet18_fpn"
# fewer proposals and RoI samples than torchvision's COCO defaults (2000 / 1000 proposals, 512 RoIs per image): a
# 128-pixel canvas holds 1-4 objects, and the defaults' RoI head costs ~5x the step on a CPU
KWARGS = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
          "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 64}
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/detection_canvases_<machine>"
                                                ".json)")
    ap.add_argument("--work", default="runs/bench-detection", help="where the runs are written")
    ap.add_argument("--seeds", default="1,2,3", help="the students' seeds (and the table's); the teacher's is 0")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each on the CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--report-only", action="store_true")
    return ap.parse_args(argv)


def common(args, seed: int, threads: int = 1) -> list[str]:
    threads = ["--set", f"train.threads={threads}"] if args.device == "cpu" else []
    kwargs = [a for k, v in KWARGS.items() for a in ("--set", f"student_kwargs.{k}={v}")]
    return [*kwargs, "--batch-size", str(args.batch), "--lr", str(args.lr), "--seed", str(seed), "--set",
            f"train.device={args.device}", "--set", "optim.clip_grad=2.5", "--set", "data.workers=1", *threads]


def cli(argv: list[str], log: Path) -> float:
    """Run ``fmkt-cli ARGV`` in a child process (its output in ``log``); seconds taken. Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "fmkt.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"fmkt-cli {' '.join(argv[:2])} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def teacher(args, work: Path) -> Path:
    out = work / "teacher"
    if not (out / "artifact" / "fmkt.json").is_file():
        print(f"teacher: {STUDENT} alone for {args.teacher_epochs} epochs (seed 0)", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        cli(["train", "--set", "task=detection", "--model", STUDENT, "--epochs", str(args.teacher_epochs),
             *common(args, 0, threads=args.jobs), "--out", str(out)], work / "teacher.log")
    return out / "artifact"


def run_one(args, work: Path, teacher_art: Path, row: str, seed: int) -> dict:
    out = work / f"{row}-s{seed}"
    method, options = ROWS[row]
    argv = ["distill", "--task", "detection", "--student", STUDENT, "--method", method, "--epochs", str(args.epochs),
            *common(args, seed), *options, "--out", str(out)]
    if method != "none":
        argv += ["--teacher", str(teacher_art)]
    seconds = cli(argv, work / f"{row}-s{seed}.log")
    meta = json.loads((out / "artifact" / "fmkt.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"row": row, "seed": seed, "seconds": round(seconds, 1), "map": meta["metrics"]["last"],
            "images_per_s": [h.get("images_per_s") for h in history], "teacher_map": (meta.get("teacher") or {})
            .get("map"), "history": history}


def latency(args, work: Path, teacher_art: Path) -> dict | None:
    art = work / f"fmkt-s{args.seeds.split(',')[0]}" / "artifact"
    if not art.is_dir():
        return None
    out = work / "bench.json"
    cli(["bench", str(art), "--teacher", str(teacher_art), "--backends", "eager,onnxruntime", "--batch", "1",
         "--warmup", "3", "--iters", "20", "--device", args.device, "--out", str(out)], work / "bench.log")
    doc = json.loads(out.read_text())
    return {"rows": [{k: r.get(k) for k in ("backend", "variant", "batch", "status", "p50_ms", "p90_ms", "reason")}
                     for r in doc["rows"]], "environment": doc.get("environment")}


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(doc: dict, seeds=None) -> str:
    """Mean ± std per row over the runs of ``seeds`` (all runs if None)."""
    runs, lines = doc["runs"], []
    if seeds is not None:
        runs = {k: r for k, r in runs.items() if r["seed"] in set(seeds)}
    lines.append("| row | seeds | " + " | ".join(KEYS) + " | train img/s | p50 ms (eager / ORT, b1) |")
    lines.append("|---|---|" + "---|" * len(KEYS) + "---|---|")
    lat = {(r["backend"], r["variant"]): r for r in (doc.get("latency") or {}).get("rows", [])}
    variant = {"none": "student", "pkd": "student", "fmkt": "4", "fmkt_aux": "student", "fmkt_detach": "4",
               "pkd_w1": "student", "fmkt_w1": "4", "fmkt_detach_w1": "4", "teacher": "teacher"}
    for row in [*ROWS, "teacher"]:
        got = [r for r in runs.values() if r["row"] == row]
        if row == "teacher":
            got = [{"map": r["teacher_map"], "images_per_s": []} for r in runs.values()
                   if r["row"] != "none" and r.get("teacher_map")][:1]
        if not got:
            continue
        maps = [r["map"] for r in got]
        cells = [mean_std([m.get(k) for m in maps]) for k in KEYS]
        speed = mean_std([statistics.mean(x for x in r["images_per_s"] if x) for r in got if r["images_per_s"]])
        ms = [lat.get((b, variant[row]), {}).get("p50_ms") for b in ("eager", "onnxruntime")]
        ms = " / ".join(f"{m:.0f}" if m is not None else "n/a" for m in ms)
        lines.append(f"| {row} | {len(got)} | " + " | ".join(cells) + f" | {speed} | {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fmkt.runtime import environment

    env = environment(torch.device(args.device))
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"detection_canvases_{machine_slug(args.device, env['machine'])}.json")
    doc = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    if not args.report_only:
        doc.update({"protocol": {k: v for k, v in vars(args).items() if k not in ("out", "report_only", "rows")},
                    "student": STUDENT, "environment": env, "date": time.strftime("%Y-%m-%d")})
        if "0" in args.seeds.split(","):
            print("note: seed 0 is the teacher's; that student starts from the teacher's own initial weights",
                  flush=True)
        work = (ROOT / args.work).resolve()
        teacher_art = teacher(args, work)
        todo = [(row, int(s)) for s in args.seeds.split(",") for row in args.rows.split(",")
                if f"{row}-s{s}" not in doc["runs"]]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_one, args, work, teacher_art, row, seed): (row, seed) for row, seed in todo}
            for future in futures:
                result = future.result()
                doc["runs"][f"{result['row']}-s{result['seed']}"] = result
                write_json(out, doc)
                print(f"{result['row']} seed {result['seed']}: AP {result['map']['AP']:.2f} "
                      f"({result['seconds']:.0f} s)", flush=True)
        doc["latency"] = latency(args, work, teacher_art)
        write_json(out, doc)
    print(table(doc, [int(x) for x in args.seeds.split(",")]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
