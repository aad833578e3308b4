"""Accuracy benchmark on Fashion-MNIST: every method, the same teacher, student, epochs and seeds.

    python benchmarks/accuracy.py --protocol converged --jobs 4    # the GPU protocol (full data, 30 epochs, 5 seeds)
    python benchmarks/accuracy.py --protocol cpu --jobs 2          # what 2 CPU cores afford (~2 h), labelled as such
    python benchmarks/accuracy.py --protocol core --epochs 3 --jobs 5  # the 5 core rows (scripts/gpu_accuracy.sh core)
    python benchmarks/accuracy.py --protocol vit-student --jobs 2 --threads 1  # a DeiT student of wrn_16_2 (2 cores)
    python benchmarks/accuracy.py --protocol vit-teacher --jobs 2 --threads 1  # a DeiT teacher of resnet8
    python benchmarks/accuracy.py                                  # the recipe's own setting (the older CPU table)
    python benchmarks/accuracy.py --report-only --out FILE         # the tables of the runs saved in FILE

Protocols (PROTOCOLS): ``converged``: the full 60,000 / 10,000 split, a wrn_16_2 teacher trained to convergence
(its curve is reported), students for 30 epochs (the table shows how much the last 5 epochs still moved), seeds
0-4, every row below; ``cpu``: a 10,000-image seeded subset, 6 epochs, seeds 0-2, the rows 2 cores can afford;
``core``: full data, seeds 0-2, the student alone, KD, DKD, DIST and FM-KT, as many epochs as the GPU time box of
``scripts/gpu_accuracy.sh core`` affords (``--epochs``, the same for every row; ``--teacher-epochs`` for the teacher);
``vit-student`` / ``vit-teacher`` (VIT_PROTOCOLS): the core rows with a timm DeiT as the student / the teacher.
Rows (ROWS): the student alone; KD, DKD and DIST at their authors' published CIFAR-100 settings; FM-KT with its
authors' choices (DIST as D, rectified flow, N = 8) and with the best D found on held-out training images (never
the test split); FM-KT^Theta and OFM-KT; logit standardization (LS) with KD, DKD and FM-KT; FM-KT^Theta with the
dwconv and mlp encoders (the accuracy side of benchmarks/pareto.py). The published settings and their sources
come from fmkt.distillers.published.

One teacher is trained once (seed 0) and shared by every run. Each finished run is saved at once to the JSON
file; a rerun skips the runs already there, so an interrupted benchmark continues where it stopped. ``--jobs N``
runs N trainings at once (several fit on one GPU). Writes the JSON (every run with its per-epoch history) and a
Markdown table (benchmarks/accuracy_stats.py: mean +- std, paired differences to FM-KT with a t-test and an exact
sign-flip test, Holm-adjusted over the rows, and the convergence check at the same fraction of the LR schedule, which
each history entry records as ``lr_fraction``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_json  # noqa: E402
from benchmarks.accuracy_stats import headline, markdown, pareto_input  # noqa: E402


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    train_subset: int | None
    epochs: int
    seeds: tuple
    teacher_epochs: int
    rows: tuple
    holdout: int
    student: str = "resnet8"
    # the ViT protocols' choices; empty / None: the fashion-mnist recipe's (wrn_16_2 teacher, SGD at lr 0.05)
    student_kwargs: dict = field(default_factory=dict)  # the student's factory (timm: img_size, patch_size, depth)
    optim: dict = field(default_factory=dict)  # the students' optimiser section
    teacher_arch: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    teacher_optim: dict = field(default_factory=dict)  # the teacher's (fmkt.commands.teacher_config copies optim)
    teacher_lr: float | None = None
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)


@dataclass(frozen=True)
class Row:
    method: dict  # method section overrides
    published: str | None  # key of fmkt.distillers.published.PUBLISHED, None = fmkt defaults
    cpu: bool = False  # in the CPU protocol
    recipe: bool = False  # in the recipe protocol (the older table)
    core: bool = False  # in the GPU core protocol (the baselines and FM-KT: scripts/gpu_accuracy.sh core)


ROWS = {
    "none": Row({"name": "none"}, None, cpu=True, recipe=True, core=True),
    "kd": Row({"name": "kd"}, "kd", cpu=True, recipe=True, core=True),
    "dkd": Row({"name": "dkd"}, "dkd", cpu=True, recipe=True, core=True),
    "dist": Row({"name": "dist"}, "dist", cpu=True, recipe=True, core=True),
    "fmkt": Row({"name": "fmkt", "loss": "dist", "schedule": "rectified", "train_steps": "8"}, "fmkt", cpu=True,
                recipe=True, core=True),
    "fmkt (best D)": Row({"name": "fmkt"}, "fmkt", cpu=True),
    "theta": Row({"name": "theta"}, "fmkt", cpu=True, recipe=True),
    "ofmkt": Row({"name": "ofmkt"}, "fmkt", recipe=True),
    "kd+ls": Row({"name": "kd"}, "kd+ls", cpu=True),
    "dkd+ls": Row({"name": "dkd"}, "dkd+ls"),
    "fmkt+ls": Row({"name": "fmkt"}, "fmkt+ls", cpu=True),
    "theta dwconv": Row({"name": "theta", "encoder": "dwconv"}, "fmkt", cpu=True),
    "theta mlp": Row({"name": "theta", "encoder": "mlp"}, "fmkt", cpu=True),
}
# The ViT protocols (issue 21): the core rows with timm's DeiT-Tiny at Fashion-MNIST's own 28 x 28 (patch 7: 16
# patches + the class token; Z1 = the class token expanded to 7 x 7, S = its head) as the student of wrn_16_2 or the
# teacher of resnet8. A DeiT trains with AdamW (SGD at 0.05 barely moves one): DeiT's wd 0.05, an LR above its
# 5e-4 x batch / 512 for a few epochs from scratch (our choice). One evaluation, after the last epoch (2 CPU cores).
DEIT, DEIT_28 = "timm:deit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}
ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}
CORE_ROWS = tuple(r for r, x in ROWS.items() if x.core)
VIT_PROTOCOLS = {
    "vit-student": Protocol(
        "vit-student", "ViT student: timm deit_tiny_patch16_224 (img_size 28, patch_size 7, depth 6 of 12) from "
        "scratch, AdamW lr 1e-3 (0.5 warm-up epochs, cosine), wd 0.05, batch 128; wrn_16_2 teacher (SGD, 8 epochs); "
        "5,000-image subset at 28 x 28, 2 epochs, one evaluation after the last: what 2 CPU cores afford, not "
        "converged", 5000, 2, (0, 1, 2), 8, CORE_ROWS, 1000, student=DEIT, student_kwargs={**DEIT_28, "depth": 6},
        optim={**ADAMW, "warmup_epochs": 0.5}, eval_every=2),
    "vit-teacher": Protocol(
        "vit-teacher", "ViT teacher: timm deit_tiny_patch16_224 (img_size 28, patch_size 7, depth 6 of 12) from "
        "scratch, AdamW lr 1e-3, wd 0.05, cosine, 10 epochs; resnet8 students with the recipe's SGD (Nesterov, lr "
        "0.05, wd 5e-4, cosine), batch 128; 5,000-image subset at 28 x 28, 3 epochs, one evaluation after the last: "
        "what 2 CPU cores afford, not converged", 5000, 3, (0, 1, 2), 10, CORE_ROWS, 1000, teacher_arch=DEIT,
        teacher_kwargs={**DEIT_28, "depth": 6}, teacher_optim=dict(ADAMW), teacher_lr=1e-3, eval_every=3),
}
PROTOCOLS = {
    "converged": Protocol("converged", "full 60,000 / 10,000 split, 30 epochs, the GPU protocol", None, 30,
                          (0, 1, 2, 3, 4), 40, tuple(ROWS), 5000),
    "cpu": Protocol("cpu", "10,000-image subset, 6 epochs: what 2 CPU cores afford, not converged", 10000, 6,
                    (0, 1, 2), 8, tuple(r for r, x in ROWS.items() if x.cpu), 1000),
    "recipe": Protocol("recipe", "the fashion-mnist recipe's own setting (10,000 images, 4 epochs)", 10000, 4,
                       (0, 1, 2), 8, tuple(r for r, x in ROWS.items() if x.recipe), 1000),
    "core": Protocol("core", "full 60,000 / 10,000 split, the five core rows, 3 seeds, as many epochs as the GPU time "
                     "box affords (scripts/gpu_accuracy.sh core): not converged", None, 3, (0, 1, 2), 8,
                     tuple(r for r, x in ROWS.items() if x.core), 5000),
    **VIT_PROTOCOLS,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="recipe", choices=list(PROTOCOLS))
    ap.add_argument("--seeds", default=None, help="override the protocol's seeds, e.g. 0,1,2")
    ap.add_argument("--rows", default=None, help="override the protocol's rows (comma list of ROWS)")
    ap.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="override the protocol's teacher epochs")
    ap.add_argument("--train-subset", type=int, default=None, help="override the protocol's subset (a smoke run)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (several fit on one GPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per training (0: torch's default; on CPU, cores / --jobs)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", default="runs/bench-accuracy", help="run folders")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/accuracy_<protocol>.json)")
    ap.add_argument("--report-only", action="store_true", help="only print the table of the runs saved in --out")
    return ap.parse_args(argv)


def published(key: str | None) -> tuple[dict, str]:
    """(method overrides, where they come from) of a published setting; ({}, our defaults) when unknown."""
    if key is None:
        return {}, "fmkt defaults"
    try:
        from fmkt.distillers.published import PUBLISHED
    except ImportError:
        return {}, "fmkt defaults (no published-settings registry)"
    entry = PUBLISHED.get(key)
    if entry is None:
        return {}, f"fmkt defaults (no published setting for {key})"
    return dict(entry.method), entry.source


def base_config(p: Protocol, args, seed: int, out: str, method: dict | None = None, data: dict | None = None,
                teacher: bool = False):
    """A run's config: the fashion-mnist recipe with the protocol's overrides; ``teacher``: the config whose default
    teacher is trained (its optimiser is the protocol's teacher_optim, the students' is p.optim)."""
    from fmkt.config import build_config

    threads = 0 if teacher else getattr(args, "threads", 0)  # the teacher trains alone: torch's threads
    optim = p.teacher_optim if teacher else p.optim
    o = {"data": {"train_subset": args.train_subset or p.train_subset,
                  **({"dir": args.data_dir} if args.data_dir else {}),
                  **(data or {})},
         "train": {"seed": seed, "epochs": args.epochs or p.epochs, "eval_every": p.eval_every,
                   **({"threads": threads} if threads else {})},
         "teacher": {"epochs": args.teacher_epochs or p.teacher_epochs, **teacher_section(p)},
         "student": p.student, "out": out,
         "method": {"eval_steps": [1, 2, 4, 8], **(method or {})},
         **({"student_kwargs": dict(p.student_kwargs)} if p.student_kwargs else {}),
         **({"optim": dict(optim)} if optim else {})}
    return build_config("fashion-mnist", [o])


def teacher_section(p: Protocol) -> dict:
    """The teacher keys a protocol sets (none for the older protocols: the recipe's wrn_16_2 at lr 0.05)."""
    return {k: v for k, v in {"arch": p.teacher_arch, "kwargs": dict(p.teacher_kwargs), "lr": p.teacher_lr}.items()
            if v}


def history_entry(h: dict, cfg) -> dict:
    """One epoch as saved: its top-1 per K, its training images/s (several runs share a GPU: the rate each got) and
    LR / peak LR at its end (fmkt.optim.lr_factor), so the convergence check compares every row at the same point of
    the schedule."""
    from fmkt.optim import lr_factor

    return {"epoch": h["epoch"], "top1": h.get("top1", {}), "images_per_s": h.get("images_per_s"),
            "lr_fraction": round(lr_factor(cfg, h["epoch"]), 6)}


def run_one(job: dict) -> dict:
    """One training (in this process or a worker): the row's config, the shared teacher, fit."""
    from rich.console import Console

    from fmkt.commands import check_config
    from fmkt.engine import fit
    from fmkt.errors import FmktError
    from fmkt.teacher import load_teacher

    p, args = PROTOCOLS[job["protocol"]], argparse.Namespace(**job["args"])
    cfg = check_config(base_config(p, args, job["seed"], job["out"], job["method"], job.get("data")))
    teacher, tinfo = None, None
    from fmkt.distillers import METHODS

    if METHODS[cfg.method.name].needs_teacher:
        t = job["teacher"]
        from fmkt.data import dataset_info

        info = dataset_info("fashion-mnist", args.data_dir, image_size=cfg.data.image_size)
        teacher, tinfo = load_teacher(t["source"], arch=t["arch"], num_classes=info.num_classes,
                                      in_channels=info.in_channels, mean=info.mean, std=info.std,
                                      input_size=info.image_size)
        tinfo["accuracy"] = t["accuracy"]
    try:
        res = fit(cfg, teacher=teacher, teacher_info=tinfo, console=Console(stderr=True, quiet=job["quiet"]))
    except FmktError as exc:  # e.g. a loss that diverges with this setting: a result to report, not a dead benchmark
        return {"row": job["row"], "seed": job["seed"], "method": cfg.method.name, "failed": str(exc),
                "top1": {}, "settings": job["settings"]}
    return {"row": job["row"], "seed": job["seed"], "method": cfg.method.name, "encoder": cfg.method.encoder
            if METHODS[cfg.method.name].flow else None, "top1": res.last, "best": res.best,
            "seconds": round(res.seconds, 1), "settings": job["settings"],
            "history": [history_entry(h, cfg) for h in res.history]}


def teacher_record(p: Protocol, args, console) -> dict:
    from fmkt.commands import obtain_teacher, teacher_accuracy

    cfg = base_config(p, args, 0, f"{args.work}/teacher", teacher=True)
    teacher, tinfo = obtain_teacher(cfg, console)  # trained once (seed 0), cached, shared by every run
    tinfo["accuracy"] = teacher_accuracy(teacher, cfg)
    metrics = Path(tinfo["source"]).parent / "metrics.jsonl"
    curve = [json.loads(line).get("top1", {}).get("plain") for line in metrics.read_text().splitlines()] \
        if metrics.is_file() else []
    tinfo["curve"] = [v for v in curve if v is not None]  # the evaluated epochs (every p.eval_every-th)
    return tinfo


def fmkt_with(d: str) -> dict:
    """FM-KT at its authors' published choices with D = ``d``: the published D keeps its published parameters, any
    other D runs at its own defaults (another loss's parameters would not apply to it)."""
    pub, _ = published("fmkt")
    if d != pub.get("loss"):
        pub.pop("loss_params", None)
    return {**pub, "name": "fmkt", "loss": d}


def select_loss(p: Protocol, args, results: dict, out: Path, jobs) -> str:
    """FM-KT's D with the best held-out top-1 at K = 8 (seed 0, ``p.holdout`` training images held out)."""
    sel = results.setdefault("selection", {"holdout": p.holdout, "holdout_top1": {}})
    from fmkt.losses import LOSSES  # every registered D is a candidate

    todo = [d for d in LOSSES if d not in sel["holdout_top1"]]
    for d, res in zip(todo, jobs([dict(row=f"select {d}", seed=0, method=fmkt_with(d),
                                       data={"holdout": p.holdout}, settings="") for d in todo])):
        sel["holdout_top1"][d] = res["top1"].get("8")  # None: the training failed (the reason is kept)
        if res.get("failed"):
            sel.setdefault("failed", {})[d] = res["failed"]
        write_json(out, results, indent=1)
    ran = {d: v for d, v in sel["holdout_top1"].items() if v is not None}
    if not ran:
        raise SystemExit(f"every candidate D failed: {sel.get('failed')}")
    sel["best"] = max(ran, key=ran.get)
    return sel["best"]


def protocol_record(p: Protocol, args) -> dict:
    """The results file's protocol section (the ViT protocols add their models' and optimisers' keys)."""
    kw = ", ".join(f"{k}={v}" for k, v in p.student_kwargs.items())  # the table's student: with its kwargs
    extra = {"student_arch": p.student if kw else None, "student_kwargs": p.student_kwargs, "optim": p.optim,
             **{f"teacher_{k}": v for k, v in teacher_section(p).items()}, "teacher_optim": p.teacher_optim}
    return {"name": p.name, "description": p.description, "student": f"{p.student} ({kw})" if kw else p.student,
            "epochs": args.epochs or p.epochs, "teacher_epochs": args.teacher_epochs or p.teacher_epochs,
            "train_subset": args.train_subset or p.train_subset, **{k: v for k, v in extra.items() if v}}


def pending(results: dict, rows: list, seeds: list, best_d: str | None) -> list[dict]:
    """The (row, seed) runs not yet in ``results``, seed by seed, with their method sections and sources."""
    done, todo = {(r["row"], r["seed"]) for r in results["runs"]}, []
    for seed in seeds:
        for row in (r for r in rows if (r, seed) not in done):
            pub, source = published(ROWS[row].published)
            method = fmkt_with(best_d) if row == "fmkt (best D)" else {**pub, **ROWS[row].method}
            todo.append(dict(row=row, seed=seed, method=method, settings=f"{method} ({source})"))
    return todo


def main(argv=None) -> int:
    from rich.console import Console

    from fmkt.runtime import environment

    args = parse_args(argv)
    p = PROTOCOLS[args.protocol]
    out = Path(args.out or f"benchmarks/results/accuracy_{p.name}.json")
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    if args.report_only:
        print(markdown(results))
        write_json(out.with_name(out.stem + "_pareto.json"), pareto_input(results), indent=1)
        return 0
    console = Console(stderr=True)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(p.seeds)
    rows = args.rows.split(",") if args.rows else list(p.rows)
    t0 = time.perf_counter()
    # a later call with other --rows or --seeds adds to the same file: the table lists every row run so far
    done_rows, done_seeds = results.get("rows", []), results.get("seeds", [])
    results.update(protocol=protocol_record(p, args),
                   seeds=sorted(set(done_seeds) | set(seeds)),
                   rows=done_rows + [r for r in rows if r not in done_rows],
                   commands=[*results.get("commands", []), "python " + " ".join(sys.argv)],
                   environment=environment(), date=time.strftime("%Y-%m-%d"))
    spent_before = results.get("total_seconds", 0.0)
    results["teacher"] = teacher_record(p, args, console)
    console.print(f"teacher {results['teacher']['arch']}: {results['teacher']['accuracy']:.2f} %")
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(protocol=p.name, args=vars(args), teacher=results["teacher"], quiet=args.jobs > 1)

    def jobs(batch):
        batch = [{**common, "out": f"{args.work}/{j['row'].replace(' ', '_')}-s{j['seed']}", **j} for j in batch]
        if args.jobs <= 1:
            return map(run_one, batch)
        pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"))
        return pool.map(run_one, batch)

    best_d = select_loss(p, args, results, out, jobs) if "fmkt (best D)" in rows else None
    for res in jobs(pending(results, rows, seeds, best_d)):
        if res.get("failed"):  # kept apart (the table's statistics are over finished runs), and said
            results.setdefault("failed_runs", []).append(res)
            write_json(out, results, indent=1)
            console.print(f"  {res['row']} seed {res['seed']}: failed: {res['failed']}")
            continue
        results["runs"].append(res)
        write_json(out, results, indent=1)
        console.print(f"  {res['row']} seed {res['seed']}: top-1 {headline(res):.2f} ({res['seconds']:.0f} s)")
    results["total_seconds"] = round(spent_before + time.perf_counter() - t0, 1)  # over every call
    write_json(out, results, indent=1)
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    write_json(out.with_name(out.stem + "_pareto.json"), pareto_input(results), indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
