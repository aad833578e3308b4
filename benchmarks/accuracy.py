"""Accuracy benchmark on Fashion-MNIST: every method, same teacher, student, epochs and seeds.

    python benchmarks/accuracy.py                      # the BENCHMARKS.md run (about an hour on 2 cores)
    python benchmarks/accuracy.py --seeds 0 --epochs 1 --train-subset 1000   # a quick look

Starts from the shipped `fashion-mnist` recipe. One teacher is trained once (seed 0) and shared by every run.
Each finished run is saved at once to the JSON file, and a rerun skips runs already there, so an interrupted
benchmark continues where it stopped. Prints and writes a markdown table of mean +- std top-1 per K.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from fmkt.config import build_config
from fmkt.distillers import METHODS  # every registered method, in the registry's order
from fmkt.engine import fit
from fmkt.evaluation import step_label
from fmkt.commands import obtain_teacher, teacher_accuracy
from fmkt.runtime import environment, environment_rows

KEYS = ["plain", "1", "2", "4", "8", "0"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fashion-mnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--loss", default=None, help="metric loss of the FM-KT family (recipe: dist)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", default="runs/bench-accuracy", help="run folders")
    ap.add_argument("--out", default="benchmarks/results/accuracy_fashion-mnist.json")
    ap.add_argument("--report-only", action="store_true", help="only print the table of the runs saved in --out")
    return ap.parse_args(argv)


def overrides(args, **extra) -> dict:
    o: dict = {"data": {}, "train": {}, "method": {}}
    if args.epochs:
        o["train"]["epochs"] = args.epochs
        o["train"]["eval_every"] = args.epochs
    if args.train_subset:
        o["data"]["train_subset"] = args.train_subset
    if args.data_dir:
        o["data"]["dir"] = args.data_dir
    if args.loss:
        o["method"]["loss"] = args.loss
    for k, v in extra.items():
        o.setdefault(k, {}).update(v) if isinstance(v, dict) else o.__setitem__(k, v)
    return o


def summarise(results: dict) -> list[dict]:
    rows = []
    for method in METHODS:
        runs = [r for r in results["runs"] if r["method"] == method]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs), "seconds": statistics.mean(r["seconds"] for r in runs)}
        for k in KEYS:
            vals = [r["top1"][k] for r in runs if k in r["top1"]]
            if vals:
                row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    cfg = results["config"]
    head = ("| method | seeds | student (plain) | K=1 | K=2 | K=4 | K=8 | theta (K=0) | s / run |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for row in summarise(results):
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if k in row else "" for k in KEYS]
        lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    t = results["teacher"]
    return (f"Teacher {t['arch']}: {t['accuracy']:.2f} % top-1. Student {cfg['student']}; "
            f"{cfg['train']['epochs']} epochs on {cfg['data']['train_subset'] or 'all'} training images; "
            f"FM-KT loss {cfg['method']['loss']}, encoder {cfg['method']['encoder']}, N = {cfg['method']['train_steps']}; "
            f"seeds {results['seeds']}; mean ± std of top-1 (%) on the 10,000-image test split.\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    if args.report_only:
        print(markdown(results))
        return 0
    done = {(r["method"], r["seed"]) for r in results["runs"]}

    base = build_config(args.recipe, [overrides(args, train={"seed": 0}, out=f"{args.work}/teacher")])
    t0 = time.perf_counter()
    teacher, tinfo = obtain_teacher(base, console)  # trained once (seed 0), cached, shared by every run
    tinfo["accuracy"] = teacher_accuracy(teacher, base)
    results.update({"config": base.to_dict(), "teacher": tinfo, "seeds": seeds,
                    "versions": environment_rows(environment()),  # the rows of `fmkt-cli info`
                    "command": "python " + " ".join(sys.argv),
                    "date": time.strftime("%Y-%m-%d")})
    console.print(f"teacher {tinfo['arch']}: {tinfo['accuracy']:.2f} %")
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                continue
            cfg = build_config(args.recipe, [overrides(args, train={"seed": seed}, method={"name": method},
                                                       teacher={"path": tinfo["source"]},
                                                       out=f"{args.work}/{method}-s{seed}")])
            console.print(f"[bold]{method} seed {seed}[/]")
            uses_teacher = method not in ("none", "ofmkt")
            res = fit(cfg, teacher=teacher if uses_teacher else None, teacher_info=tinfo if uses_teacher else None,
                      console=console)
            results["runs"].append({"method": method, "seed": seed, "top1": res.last, "best": res.best,
                                    "seconds": round(res.seconds, 1)})
            out.write_text(json.dumps(results, indent=1))
            console.print(f"  {method} seed {seed}: " + ", ".join(f"{step_label(k)} {v:.2f}" for k, v in res.last.items())
                          + f"  ({res.seconds:.0f} s)")
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
