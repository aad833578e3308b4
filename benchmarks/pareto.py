"""The accuracy-latency Pareto users deploy from: per meta-encoder and K, p50 latency against the student alone.

    python benchmarks/pareto.py                                    # CPU (ONNX Runtime), resnet8x4, latency only
    python benchmarks/pareto.py --iters 30 --warmup 5              # the same, quicker
    python benchmarks/pareto.py --accuracy results.json            # with top-1 mean +- std per (encoder, K)
    python benchmarks/pareto.py --students resnet8x4,resnet8       # also the Fashion-MNIST-shaped resnet8
    python benchmarks/pareto.py --device cuda                      # GPU: CUDA-graph replay, fp32
    python benchmarks/pareto.py --device cuda --backends cudagraph,compile --precision fp32,fp16

For every student (``resnet8x4``: CIFAR-shaped, 3x32x32, 100 classes; ``resnet8``: Fashion-MNIST-shaped, 1x28x28,
10 classes) and every encoder (``--encoders``, default conv, dwconv, mlp), an FM-KT^Theta artifact with random
weights (latency does not depend on them) is timed by ``fmkt.bench.run_bench`` at K in {0 (the theta head), 1, 2,
4, 8} and batch 1 and 64: the one timing harness, so each run also times the student alone (normalisation +
backbone + its own head) interleaved with the K variants, and ``x student`` is the ratio to that run's own
baseline. The table's ``student alone`` row is the median of the runs' baselines. CPU: ONNX Runtime (CPU
provider); CUDA: CUDA-graph replay of eager (``--backends`` adds ``compile``, torch.compile, which builds once per
K and batch, ~20 s each: ~12 min more for 3 encoders; or ``trt``, ``onnxruntime``, ``eager``: any bench backend).
``--device cuda`` without a visible GPU stops with one sentence (exit 2, nothing timed or written); ``--device
auto`` takes the GPU when there is one and otherwise says, in one line, that it times on the CPU.

Accuracy (``--accuracy FILE``, optional; without it the table says "not measured"): a JSON object whose format
benchmarks/pareto_accuracy.py describes (benchmarks/accuracy.py writes one: ``accuracy_<protocol>_pareto.json``).

Outputs (``--out``, default benchmarks/results): ``pareto_<device>-<machine>[_<--name>].md`` (the tables), ``.json``
(the machine and versions from fmkt.runtime.environment, the settings, the accuracy source and every bench row) and
one ``.png``: top-1 against p50 latency per encoder with K labelled, the student alone and the best baseline as
reference lines (a panel per student and batch), or, without accuracy, latency against K per encoder as a
multiple of the student alone (x student, comparable across the runs) with 1.0 and 1.3 marked. Each bench run's
own JSON/CSV/PNG go under ``--work``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import STUDENTS, find_row, machine_slug, synthetic_artifact, write_json  # noqa: E402
from benchmarks.pareto_accuracy import Accuracy, accuracy_json, accuracy_lines, fmt_acc, load_accuracy  # noqa: E402
from fmkt.bench import BenchSettings, row_dict, run_bench  # noqa: E402
from fmkt.errors import FmktError  # noqa: E402
from fmkt.flow.encoders import ENCODERS  # noqa: E402
from fmkt.runtime import environment  # noqa: E402

ENCODERS_DEFAULT = ("conv", "dwconv", "mlp")
BACKENDS = {"cpu": ["onnxruntime"], "cuda": ["cudagraph"]}
BUDGET = 1.3  # the latency a deployable K-step student should stay within, as a multiple of the student alone


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--students", default="resnet8x4", help=f"comma list of {', '.join(STUDENTS)}")
    ap.add_argument("--encoders", default=",".join(ENCODERS_DEFAULT), help="comma list of registered encoders")
    ap.add_argument("--steps", default="0,1,2,4,8")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--backends", default=None, help="default: onnxruntime on CPU, cudagraph on CUDA")
    ap.add_argument("--precision", default="fp32", help="fp32 and/or fp16 (fp16: CUDA backends)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--accuracy", default=None, help="accuracy JSON (format: benchmarks/pareto_accuracy.py)")
    ap.add_argument("--method", default="theta", help="the method whose accuracy rows are the flow points")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-pareto"), help="artifacts and bench files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="", help="suffix of the output files: pareto_<device>-<machine>_<name>.*")
    return ap.parse_args(argv)


def pick_device(asked: str) -> str:
    """cpu or cuda; FmktError (one sentence) for --device cuda without a GPU."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise FmktError("pareto.py --device cuda: no CUDA GPU is visible here, so nothing was timed; run it with "
                        "--device cpu (ONNX Runtime on the CPU) or on a machine with a GPU.")
    if asked == "auto":
        if not torch.cuda.is_available():
            print("pareto.py --device auto: no CUDA GPU is visible here; timing on the CPU (ONNX Runtime).")
            return "cpu"
        return "cuda"
    return asked


# --------------------------------------------------------------------------------------------------- timing
def make_artifact(work: Path, student: str, encoder: str) -> Path:
    """An FM-KT^Theta artifact of ``student`` with ``encoder``, random weights (seed 0), rebuilt every run so a
    changed encoder is never timed from a stale file."""
    return synthetic_artifact(work / f"{student}-{encoder}", student, encoder)


def time_all(args, device: str, students: list[str], encoders: list[str]) -> dict:
    """{student: {encoder: [bench rows as dicts]}}: one run_bench per (student, encoder)."""
    work, slug = Path(args.work), machine_slug(device, environment(torch.device(device))["machine"], with_device=True)
    backends = args.backends.split(",") if args.backends else BACKENDS[device]
    out: dict = {}
    for student in students:
        for encoder in encoders:
            path = make_artifact(work, student, encoder)
            settings = BenchSettings(backends=backends, batches=[int(b) for b in args.batch.split(",")],
                                     steps=[int(k) for k in args.steps.split(",")],
                                     precisions=args.precision.split(","), device=device, warmup=args.warmup,
                                     iters=args.iters, out=work / "bench" / f"{student}-{encoder}_{slug}.json")
            print(f"\n== {student}, encoder {encoder}: {path}", flush=True)
            res = run_bench(path, settings)
            out.setdefault(student, {})[encoder] = [row_dict(r) for r in res.rows]
    return out


# --------------------------------------------------------------------------------------------------- the table
def series_of(rows_by_encoder: dict) -> list[tuple[str, str]]:
    """(backend, precision) pairs in the order bench ran them."""
    seen = []
    for rows in rows_by_encoder.values():
        for r in rows:
            if (r["backend"], r["precision"]) not in seen:
                seen.append((r["backend"], r["precision"]))
    return seen


def collect(rows_by_encoder: dict, backend: str, precision: str, batches: list[int], acc: Accuracy | None) -> list:
    """The Pareto points of one student and series: the student alone (median of the runs' baselines), then
    (encoder, K) with p50 and x student per batch and the top-1 when known."""
    def p50s(variant, batch):
        got = [find_row(rows, backend=backend, precision=precision, variant=variant, batch=batch)
               for rows in rows_by_encoder.values()]
        return [r["p50_ms"] for r in got if r and r["status"] == "ok"]

    alone = {b: statistics.median(p50s("student", b)) if p50s("student", b) else None for b in batches}
    points = [{"encoder": None, "K": None, "p50_ms": alone, "x_student": {b: 1.0 for b in batches},
               "top1": acc.alone if acc else None, "status": {}}]
    for encoder, rows in rows_by_encoder.items():
        ks = sorted({int(r["variant"]) for r in rows if r["variant"] != "student"})
        for k in ks:
            cells = {b: find_row(rows, backend=backend, precision=precision, variant=str(k), batch=b)
                     for b in batches}
            points.append({"encoder": encoder, "K": k,
                           "p50_ms": {b: c["p50_ms"] if c and c["status"] == "ok" else None for b, c in cells.items()},
                           "x_student": {b: c["x_student"] if c else None for b, c in cells.items()},
                           "top1": acc.points.get((encoder, k)) if acc else None,
                           "status": {b: f"{c['status']}: {c['reason']}" for b, c in cells.items()
                                      if c and c["status"] != "ok"}})
    return points


def markdown(student: str, backend: str, precision: str, batches: list[int], points: list, acc: Accuracy | None,
             device: str) -> list[str]:
    spec = STUDENTS[student]
    head = ["encoder", "K"] + [h for b in batches for h in (f"p50 ms, batch {b}", f"x student, batch {b}")] + \
           ["top-1 %"]
    lines = [f"## {student} ({spec['channels']}x{spec['size'][0]}x{spec['size'][1]}, {spec['num_classes']} "
             f"classes): {backend} {precision} on {device}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, k, p):
        cells = [name, k]
        for b in batches:
            ms, x = p["p50_ms"].get(b), p["x_student"].get(b)
            cells += [f"{ms:.3f}" if ms is not None else "-", f"{x:.2f}x" if x is not None and ms is not None else "-"]
        return "| " + " | ".join(cells + [fmt_acc(p["top1"]) if acc else "not measured"]) + " |"

    for p in points:
        k = "-" if p["K"] is None else ("0 (theta head)" if p["K"] == 0 else str(p["K"]))
        lines.append(row("student alone" if p["encoder"] is None else p["encoder"], k, p))
    for method, value in (acc.baselines.items() if acc else []):
        lines.append(row(f"{method} (plain student)", "-", {**points[0], "top1": value}))
    problems = sorted({f"{p['encoder']} K={p['K']}, batch {b}: {s}" for p in points for b, s in p["status"].items()})
    return lines + ([""] + [f"- {s}" for s in problems] if problems else [])


# --------------------------------------------------------------------------------------------------- the PNG
def plot(panels: list[tuple], batches: list[int], title: str, path: Path) -> str | None:
    """One PNG: a row per student, a panel per batch. ``panels``: (student, backend, precision, points, acc or
    None). Returns why no picture was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fmkt[bench]'); the PNG was not drawn"
    fig, axes = plt.subplots(len(panels), len(batches), figsize=(6.4 * len(batches), 4.8 * len(panels)),
                             squeeze=False)
    for row, (student, backend, precision, points, acc) in zip(axes, panels):
        for ax, batch in zip(row, batches):
            has_acc = acc is not None and any(p["top1"] for p in points[1:])
            (_accuracy_panel if has_acc else _latency_panel)(ax, points, batch, acc)
            ax.set_title(f"{student}, {backend} {precision}, batch {batch}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _by_encoder(points: list) -> dict:
    out: dict = {}
    for p in points[1:]:
        out.setdefault(p["encoder"], []).append(p)
    return out


def _accuracy_panel(ax, points: list, batch: int, acc: Accuracy) -> None:
    alone = points[0]["p50_ms"].get(batch)
    for encoder, pts in _by_encoder(points).items():
        pts = [p for p in pts if p["top1"] and p["p50_ms"].get(batch) is not None]
        line = ax.plot([p["p50_ms"][batch] for p in pts], [p["top1"][0] for p in pts], "o-", label=encoder)[0]
        for p in pts:
            ax.annotate("θ" if p["K"] == 0 else f"K={p['K']}", (p["p50_ms"][batch], p["top1"][0]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    if alone is not None:
        ax.axvline(alone, color="gray", linestyle="--", linewidth=1, label="student alone (latency)")
    if acc.alone is not None:
        ax.axhline(acc.alone[0], color="gray", linestyle=":", linewidth=1, label="student alone (top-1)")
    best = acc.best_baseline()
    if best is not None:
        ax.axhline(best[1][0], color="black", linestyle="-.", linewidth=1, label=f"best baseline ({best[0]})")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if alone is not None and acc.alone is not None:
        ax.plot([alone], [acc.alone[0]], "s", color="gray")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(0.1)
    ax.set_xlabel("p50 latency (ms, log)")
    ax.set_ylabel("top-1 (%)")


def _latency_panel(ax, points: list, batch: int, acc) -> None:
    """Latency against K as a multiple of the student alone in the same bench run: the runs of different encoders
    are minutes apart, and on a shared machine only the ratio is comparable across them."""
    alone = points[0]["p50_ms"].get(batch)
    for encoder, pts in _by_encoder(points).items():
        pts = [p for p in pts if p["p50_ms"].get(batch) is not None and p["x_student"].get(batch)]
        ax.plot([p["K"] for p in pts], [p["x_student"][batch] for p in pts], "o-", label=encoder)
    where = f" ({alone:.3g} ms)" if alone is not None else ""
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"student alone{where}")
    ax.axhline(BUDGET, color="gray", linestyle=":", linewidth=1, label=f"{BUDGET}x student alone")
    ax.set_xticks(sorted({p["K"] for p in points[1:]}))
    ax.set_xlabel("K flow steps (0 = theta head)")
    ax.set_ylabel("p50 latency / student alone's p50 (same run)")


# --------------------------------------------------------------------------------------------------- main
def report(args, device: str, results: dict, acc: Accuracy | None, run: dict) -> dict:
    """Write the Markdown, the JSON and the PNG; return the file paths."""
    env = environment(torch.device(device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"pareto_{machine_slug(device, env['machine'], with_device=True)}" \
                 f"{'_' + args.name if args.name else ''}"
    batches = [int(b) for b in args.batch.split(",")]
    m = env["machine"]
    md = _header(args, env, device, run) + accuracy_lines(acc)
    panels, tables = [], {}
    for student, by_encoder in results.items():
        mine = acc if acc is not None and acc.applies_to(student) else None
        if acc is not None and mine is None:
            md += [f"({student}: the accuracy file is for {acc.student}, so no top-1 is shown here.)", ""]
        for backend, precision in series_of(by_encoder):
            points = collect(by_encoder, backend, precision, batches, mine)
            md += markdown(student, backend, precision, batches, points, mine, device) + [""]
            tables[f"{student} {backend} {precision}"] = points
            if len(panels) == 0 or panels[-1][0] != student:
                panels.append((student, backend, precision, points, mine))
    title = (f"{m.get('gpu') or m['cpu']} ({m['cores']} cores), torch {env['versions']['torch']}, "
             f"{time.strftime('%Y-%m-%d')}")
    why = plot(panels, batches, title, stem.with_suffix(".png"))
    doc = {"format": "fmkt-pareto", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python benchmarks/pareto.py " + " ".join(sys.argv[1:]), "machine": env["machine"],
           "versions": env["versions"], "device": device, **run,
           "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
           "accuracy": accuracy_json(acc), "plot": {"written": why is None, **({"reason": why} if why else {})},
           "tables": tables, "bench_rows": results}
    write_json(stem.with_suffix(".json"), doc, indent=1, default=str)
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return {"md": str(stem.with_suffix(".md")), "json": str(stem.with_suffix(".json")),
            **({"png": str(stem.with_suffix(".png"))} if why is None else {})}


def _header(args, env: dict, device: str, run: dict) -> list[str]:
    m, v = env["machine"], env["versions"]
    start, end = run["load_average_1min"]
    timing = ("host p50: end to end, pinned batch in, logits back" if device == "cuda" else "wall clock per call")
    return [f"# Pareto: latency per meta-encoder and K ({time.strftime('%Y-%m-%d')})", "",
            f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; torch "
            f"{v['torch']}, onnxruntime {v.get('onnxruntime')}. Command: `python benchmarks/pareto.py "
            f"{' '.join(sys.argv[1:])}` ({args.warmup} warm-up + {args.iters} timed calls, {timing}; "
            f"{run['seconds']:.0f} s; 1-min load average {start:.1f} at the start, {end:.1f} at the end).", "",
            "Random weights (latency only). `x student`: p50 over the student alone's p50 in the same bench run "
            "(interleaved call by call), the number to compare across encoders; `student alone`: the median of the "
            "runs' baselines. Each encoder is its own run, minutes apart, so on a shared machine their absolute ms "
            "also carry the load of the moment.", ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        students = args.students.split(",")
        encoders = args.encoders.split(",")
        bad = [s for s in students if s not in STUDENTS] + [e for e in encoders if e not in ENCODERS]
        if bad:
            raise FmktError(f"unknown student or encoder {bad[0]!r}; students: {', '.join(STUDENTS)}; encoders: "
                            f"{', '.join(ENCODERS)}.")
        acc = load_accuracy(args.accuracy, args.method) if args.accuracy else None
        start, load = time.perf_counter(), os.getloadavg()[0]
        results = time_all(args, device, students, encoders)
        run = {"seconds": round(time.perf_counter() - start, 1),
               "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
        files = report(args, device, results, acc, run)
    except FmktError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
