"""What a bench run reports: its rows, the JSON header (model, machine, versions, method), the files (JSON, CSV,
the accuracy-latency PNG) and the tables (rich for the CLI, Markdown for BENCHMARKS.md)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fmkt import __version__
from fmkt.errors import FmktError
from fmkt.files import atomic_write_bytes
from fmkt.runtime import environment

from .plan import BenchSettings, Source, Unavailable, variant_label

CSV_FIELDS = ["backend", "precision", "batch", "variant", "label", "status", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
              "throughput", "device_p50_ms", "device_p90_ms", "device_p99_ms", "x_student", "top1", "iters",
              "build_s", "reason"]
METHOD = ("host: wall clock per call (CPU), or end to end from the pinned host batch to the logits back on the host "
          "(CUDA); device (CUDA): the span between CUDA events recorded on the stream just before and after the "
          "call, input already on the GPU: for eager and compile it includes the gaps while the host is still "
          "launching kernels (a launch-bound model shows its launch cost there), for cudagraph, trt and onnxruntime "
          "(CUDA) it is close to pure GPU execution; fp32: IEEE fp32 (TF32 off in cuBLAS, cuDNN, TensorRT and ONNX "
          "Runtime); x_student: p50 over the student alone's p50 on the same backend, precision and batch")


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    variant: str  # "student" | "0" | "1" | ...
    status: str  # ok | unavailable | failed
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    throughput: float | None = None  # images / s from the mean host latency
    device_p50_ms: float | None = None  # CUDA: stream span between events around the call (eager: with launch gaps)
    device_p90_ms: float | None = None
    device_p99_ms: float | None = None
    x_student: float | None = None  # p50 / the student alone's p50 on the same backend, precision and batch
    top1: float | None = None  # the artifact's accuracy at this K (%)
    iters: int = 0
    build_s: float | None = None  # export / compile time of this variant (once per backend, precision, variant)

    @property
    def label(self) -> str:
        return variant_label(self.variant)


@dataclass
class BenchResult:
    rows: list[Row]
    info: dict
    files: dict  # json / csv / png -> path (png absent when it could not be drawn: see info["plot"])
    seconds: float
    estimate_s: float


def _ratios(rows: list[Row]) -> None:
    base = {(r.backend, r.precision, r.batch): r.p50_ms for r in rows if r.variant == "student" and r.status == "ok"}
    for r in rows:
        ref = base.get((r.backend, r.precision, r.batch))
        if r.status == "ok" and ref:
            r.x_student = r.p50_ms / ref


def device_slug(machine: dict) -> str:
    """A file-name word for the machine (environment()["machine"]): its GPU, else its CPU model."""
    name = machine.get("gpu") or machine["cpu"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


# --------------------------------------------------------------------------------------------------- the JSON header
def run_info(path, source: Source, s: BenchSettings, device: torch.device, variants: list[str], notes: list[str],
             estimate_s: float, seconds: float) -> dict:
    """Everything the JSON says besides its rows (the keys are the file format: keep them)."""
    env = environment(device)
    return {
        "format": "fmkt-bench", "fmkt_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(Path(path).resolve()),
        "artifact_sha256": (source.meta or {}).get("weights_sha256"),
        "model": _model_summary(source),
        "machine": env["machine"], "versions": env["versions"],
        "settings": {"backends": s.backends, "batches": s.batches, "variants": variants, "precisions": s.precisions,
                     "device": device.type, "warmup": s.warmup, "iters": s.iters},
        "method": METHOD,
        "accuracy_precision": ((source.meta or {}).get("metrics") or {}).get(
            "precision", "not recorded (an artifact older than fmkt 0.1's metrics precision: on CUDA its accuracy "
                         "came from bf16 autocast)"),
        "notes": notes, "estimate_s": round(estimate_s, 1), "seconds": round(seconds, 1),
    }


def _model_summary(source: Source) -> dict:
    if source.meta is None:
        e = source.export_meta
        return {"arch": e.get("arch"), "method": e.get("method"), "steps": e.get("steps"), "input": e["input"]["shape"]}
    if source.task == "detection":
        from .detection import detection_summary

        return detection_summary(source)
    spec = source.meta["model"]
    return {"arch": spec["arch"], "method": source.meta.get("method"), "encoder": spec.get("encoder"),
            "schedule": spec.get("schedule"), "classes": spec["num_classes"],
            "input": [spec["input"]["channels"], *spec["input"]["size"]],
            "dataset": (source.meta.get("dataset") or {}).get("name"),
            "parameters": sum(p.numel() for p in source.model.parameters())}


# --------------------------------------------------------------------------------------------------- files
def output_paths(source: Source, s: BenchSettings, device: torch.device) -> tuple[Path, Path, Path]:
    if s.out is not None:
        out = Path(s.out)
        if out.is_dir() or str(s.out).endswith(("/", os.sep)):
            raise FmktError(f"--out {s.out} is a folder; pass a file path such as {Path(s.out) / 'bench.json'}.")
        if out.suffix.lower() != ".json":
            out = out.with_suffix(".json")
    else:
        out = source.path.resolve().parent / "bench" / f"bench-{device.type}.json"
    if out.parent.exists() and not out.parent.is_dir():
        raise FmktError(f"cannot write {out}: {out.parent} is a file.")
    return out, out.with_suffix(".csv"), out.with_suffix(".png")


def row_dict(r: Row) -> dict:
    d = asdict(r)
    d["label"] = r.label
    for k, v in d.items():
        if isinstance(v, float):
            d[k] = round(v, 4)
    return d


def write_outputs(rows: list[Row], info: dict, json_path: Path, csv_path: Path, png_path: Path) -> dict:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files = {"json": str(json_path), "csv": str(csv_path)}
    try:
        png = plot_bytes(rows, info)
        info["plot"] = {"written": True, "file": png_path.name}
    except Unavailable as exc:
        png = None
        info["plot"] = {"written": False, "reason": str(exc)}
    if png is not None:
        atomic_write_bytes(png_path, png)
        files["png"] = str(png_path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row_dict(r).items() if k in CSV_FIELDS})
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    doc = {**info, "rows": [row_dict(r) for r in rows]}
    atomic_write_bytes(json_path, (json.dumps(doc, indent=2) + "\n").encode())
    return files


# --------------------------------------------------------------------------------------------------- the PNG
def plot_bytes(rows: list[Row], info: dict) -> bytes:
    """The Pareto picture: top-1 against p50 latency, one line per backend/precision, K labelled; one panel per
    batch. The student alone is a dashed vertical line (its accuracy is not in the artifact). Without accuracy
    in the artifact, latency against K instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Unavailable("matplotlib is not installed (pip install 'fmkt[bench]'); the PNG was not drawn") from None
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        raise Unavailable("no backend produced a measurement; nothing to plot")
    batches = sorted({r.batch for r in ok})
    has_acc = any(r.top1 is not None for r in ok if r.variant != "student")
    fig, axes = plt.subplots(1, len(batches), figsize=(6.2 * len(batches), 4.6), squeeze=False)
    series = sorted({(r.backend, r.precision) for r in ok})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes[0], batches):
        _panel(ax, [r for r in ok if r.batch == batch], series, colors, has_acc)
        ax.set_title(f"batch {batch}")
        _axes(ax, has_acc)
    m = info["machine"]
    model = info["model"]
    fig.suptitle(f"{model.get('arch')} ({model.get('method')}) on {m.get('gpu') or m['cpu']} - "
                 f"torch {info['versions']['torch']}, {info['date'][:10]}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _panel(ax, ok: list[Row], series: list[tuple], colors: list, has_acc: bool) -> None:
    """One batch: a line per (backend, precision) of ``series`` (the same colour in every panel); the student
    alone dashed."""
    for i, (backend, precision) in enumerate(series):
        color = colors[i % len(colors)]
        mine = [r for r in ok if r.backend == backend and r.precision == precision]
        pts = sorted((r for r in mine if r.variant.isdigit()), key=lambda r: int(r.variant))
        base = next((r for r in mine if r.variant == "student"), None)
        teacher = next((r for r in mine if r.variant == "teacher"), None)  # detection's --teacher: dotted
        if teacher is not None and not has_acc:
            ax.axhline(teacher.p50_ms, color=color, linestyle=":", linewidth=0.9, alpha=0.7)
        name = f"{backend} {precision}"
        if has_acc:
            pts = [r for r in pts if r.top1 is not None]
            ax.plot([r.p50_ms for r in pts], [r.top1 for r in pts], "o-", color=color, label=name)
            for r in pts:
                ax.annotate("θ" if r.variant == "0" else f"K={r.variant}", (r.p50_ms, r.top1),
                            textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
            if base is not None:
                ax.axvline(base.p50_ms, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        else:
            ax.plot([int(r.variant) for r in pts], [r.p50_ms for r in pts], "o-", color=color, label=name)
            if base is not None:
                ax.axhline(base.p50_ms, color=color, linestyle="--", linewidth=0.9, alpha=0.7)


def _axes(ax, has_acc: bool) -> None:
    if has_acc:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p50 latency (ms, log); dashed: student alone")
        ax.set_ylabel("top-1 (%)")
    else:
        ax.set_xlabel("K flow steps (0 = theta head)")
        ax.set_ylabel("p50 latency (ms); dashed: student alone")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------------------------------- tables
_HEAD = ["backend", "prec", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "img/s"]


def _collapsed(rows: list[Row]) -> tuple[list[Row], list[tuple]]:
    """Measured rows, and one (backend, precision, status, reason, how many rows) per backend that did not run."""
    ok = [r for r in rows if r.status == "ok"]
    seen: dict = {}
    for r in rows:
        if r.status != "ok":
            key = (r.backend, r.precision, r.status, r.reason)
            seen[key] = seen.get(key, 0) + 1
    return ok, [(*k, n) for k, n in seen.items()]


def result_table(result: BenchResult):
    """The rich table the CLI prints (backends that could not run: ``skipped_lines``)."""
    from rich.table import Table

    s = result.info["settings"]
    cuda = s["device"] == "cuda"
    m = result.info["machine"]
    table = Table(title=f"{result.info['model'].get('arch')} on {m.get('gpu') or m['cpu']} "
                        f"({s['warmup']} warm-up + {s['iters']} timed calls)")
    for col in _HEAD + (["stream p50 ms"] if cuda else []) + ["x student", "top-1 %"]:
        table.add_column(col, justify="left" if col in ("backend", "prec", "model") else "right")
    for r in _collapsed(result.rows)[0]:
        table.add_row(*_cells(r, cuda))
    return table


def skipped_lines(rows: list[Row]) -> list[str]:
    """One line per backend and precision that could not run, with the reason."""
    return [f"{b} {p}: {status}: {reason}" for b, p, status, reason, _ in _collapsed(rows)[1]]


def _cells(r: Row, cuda: bool) -> list[str]:
    return [r.backend, r.precision, str(r.batch), r.label, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
            f"{r.throughput:,.0f}"] + \
           ([f"{r.device_p50_ms:.3f}" if r.device_p50_ms is not None else "-"] if cuda else []) + \
           [f"{r.x_student:.2f}x" if r.x_student else "-", "" if r.top1 is None else f"{r.top1:.2f}"]


def markdown_table(rows: list[Row], cuda: bool = False) -> str:
    """The same rows as Markdown (BENCHMARKS.md); backends that could not run follow as a list."""
    head = _HEAD + (["stream p50 ms"] if cuda else []) + ["x student", "top-1 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, cuda)) + " |" for r in _collapsed(rows)[0]]
    skipped = skipped_lines(rows)
    if skipped:
        lines += [""] + [f"- {line}" for line in skipped]
    return "\n".join(lines)
