"""What a bench run will do: its settings, what it reads (artifact or export folder), the variants to time, the
accuracy per variant, and the estimate printed before anything runs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fmkt.artifact import is_artifact, load_artifact
from fmkt.detection.artifact import is_detector_artifact, load_detector_artifact
from fmkt.errors import FmktError
from fmkt.export.formats import PRECISIONS
from fmkt.runtime import resolve_device
from fmkt.student import DeployableModel

from .backends import BENCH_BACKENDS, default_backends
from .timing import time_callable

DEFAULT_STEPS = (0, 1, 2, 4, 8)
DEFAULT_BATCHES = (1, 64)


@dataclass
class BenchSettings:
    backends: list[str] | None = None  # None: default_backends(device)
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    steps: list[int] | None = None  # None: DEFAULT_STEPS that the model can run (an export folder: its K)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    device: str = "auto"  # auto | cpu | cuda
    warmup: int = 10
    iters: int = 100
    out: str | Path | None = None  # the JSON path; CSV and PNG are written next to it with the same stem
    teacher: str | Path | None = None  # detection: also time this teacher (bench/detection.py)


class Unavailable(Exception):
    """This backend cannot run here; the message is the reason shown in the table."""


def variant_label(variant: str) -> str:
    return {"student": "student", "0": "theta (K=0)", "teacher": "teacher"}.get(variant, f"K={variant}")


def check_settings(s: BenchSettings) -> tuple[BenchSettings, torch.device]:
    """The settings checked, with the device's default backends filled in (a new BenchSettings; ``s`` is left
    as it was), and the device."""
    if str(s.device).startswith("cuda") and not torch.cuda.is_available():
        raise FmktError(f"--device {s.device} was asked for but no CUDA GPU is visible here; use --device cpu.")
    if s.device not in ("auto", "cpu") and not str(s.device).startswith("cuda"):
        raise FmktError(f"unknown device {s.device!r}; use auto, cpu or cuda.")
    device = resolve_device(s.device)
    if s.backends is None:
        s = dataclasses.replace(s, backends=default_backends(device.type))
    bad = [b for b in s.backends if b not in BENCH_BACKENDS]
    if bad:
        raise FmktError(f"unknown backend {bad[0]!r}; choose from {', '.join(BENCH_BACKENDS)}.")
    bad = [p for p in s.precisions if p not in PRECISIONS]
    if bad:
        raise FmktError(f"unknown precision {bad[0]!r}; choose {' and/or '.join(PRECISIONS)}.")
    if not s.batches or any(b < 1 for b in s.batches):
        raise FmktError(f"--batch values must be >= 1, got {s.batches}.")
    if s.iters < 1 or s.warmup < 0:
        raise FmktError(f"--iters must be >= 1 and --warmup >= 0, got {s.iters} and {s.warmup}.")
    return s, device


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    """What bench reads: an artifact (model + meta), or an export folder (its files + the artifact it came from)."""
    path: Path
    model: DeployableModel | None
    meta: dict | None
    export_dir: Path | None = None
    export_meta: dict | None = None
    note: str = ""
    artifact: Path | None = None  # the artifact folder the model was loaded from
    task: str = "classification"  # or "detection" (bench/detection.py)
    teacher: nn.Module | None = None  # detection's --teacher


def load_source(path: str | Path, teacher: str | Path | None = None) -> Source:
    path = Path(path)
    if not path.exists():
        raise FmktError(f"{path} does not exist; pass an artifact folder (OUT/artifact) or an export folder.")
    if path.is_dir() and is_artifact(path):
        if is_detector_artifact(path):
            from .detection import load_detection_source

            source = load_detection_source(path)
        else:
            model, meta = load_artifact(path)
            source = Source(path, model, meta, artifact=path)
    elif path.is_dir() and (path / "export.json").is_file():
        source = _export_source(path)
    else:
        raise FmktError(f"{path} is neither an fmkt artifact (fmkt.json) nor an export folder (export.json).")
    if teacher is not None:
        from .detection import load_teacher

        source.teacher = load_teacher(source, teacher)
    return source


def _export_source(path: Path) -> Source:
    """An export folder, with the artifact it came from when that is still here and unchanged."""
    export_json = path / "export.json"
    try:
        emeta = json.loads(export_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmktError(f"{export_json} is not valid JSON ({exc}); the export folder is damaged.") from None
    if not isinstance(emeta, dict) or emeta.get("format") != "fmkt-export":
        raise FmktError(f"{export_json} is not an fmkt export description.")
    src = (emeta.get("source") or {}).get("artifact")
    model = meta = None
    note = ""
    task = emeta.get("task", "classification")
    if src and is_artifact(src):
        model, meta = (load_detector_artifact if task == "detection" else load_artifact)(src)
        if meta.get("weights_sha256") != (emeta.get("source") or {}).get("weights_sha256"):
            raise FmktError(f"the artifact {src} has changed since {path} was exported (sha256 differs); "
                            "export again or bench the artifact itself.")
    else:
        note = (f"the source artifact {src or '(not recorded)'} is not here, so only the exported file is timed "
                "(no student baseline, no accuracy)")
    return Source(path, model, meta, path, emeta, note, artifact=Path(src) if model is not None else None, task=task)


def input_shape(source: Source) -> tuple[int, ...]:
    if source.meta is not None and source.task == "detection":
        from fmkt.export.detection import input_side

        return (3, input_side(source.meta), input_side(source.meta))
    if source.meta is not None:
        inp = source.meta["model"]["input"]
        return (inp["channels"], *inp["size"])
    shape = source.export_meta["input"]["shape"]
    return tuple(int(s) for s in shape[1:])


def num_classes(source: Source) -> int:
    return source.meta["model"]["num_classes"] if source.meta is not None else source.export_meta["num_classes"]


def plan_variants(source: Source, steps: list[int] | None) -> tuple[list[str], list[str]]:
    """(variants to time, notes on requested K values that this model cannot run); the teacher's last."""
    variants, notes = _plan_variants(source, steps)
    if source.task == "detection" and source.export_dir is not None:
        from .detection import STUDENT_NOTE

        notes.append(STUDENT_NOTE)
    return variants + (["teacher"] if source.teacher is not None else []), notes


def _plan_variants(source: Source, steps: list[int] | None) -> tuple[list[str], list[str]]:
    notes = []
    if source.task == "detection" and source.export_dir is None:
        from .detection import detection_variants

        return detection_variants(source, steps)
    if source.export_dir is not None:
        k = int(source.export_meta["steps"])
        if steps is not None and k not in steps:
            raise FmktError(f"{source.path} was exported with --steps {k}; bench it with --steps {k} (or bench the "
                            "artifact to time other K).")
        main = [str(k) if source.export_meta["graph"] != "plain student (no flow)" else "student"]
        return (["student"] + main if source.model is not None and main != ["student"] else main), notes
    model = source.model
    if not model.is_flow:
        if steps is not None and any(k != 0 for k in steps):
            notes.append(f"a plain student (method {source.meta.get('method')}) has no flow steps: timing the "
                         "student alone")
        return ["student"], notes
    asked = list(DEFAULT_STEPS) if steps is None else list(steps)
    ok = model.available_steps(asked)
    if steps is not None and 0 in asked and 0 not in ok:
        notes.append("K=0 needs the FM-KT^Theta head, which this artifact has not: skipped")
    if not ok:
        raise FmktError(f"none of the steps {asked} can run on this artifact (K=0 needs a theta head).")
    return ["student"] + [str(k) for k in ok], notes


def source_module(source: Source, variant: str) -> nn.Module:
    """The module bench times for ``variant`` (a detection artifact's: bench/detection.py)."""
    if source.task == "detection":
        from .detection import detection_module

        return detection_module(source, variant)
    return variant_module(source.model, variant, (source.meta or {}).get("method"))


def variant_module(model: DeployableModel, variant: str, method: str | None) -> nn.Module:
    from fmkt.export.graph import StudentAlone, static_module

    if variant == "student":
        return StudentAlone(model).eval()
    return static_module(model, int(variant), method)


def accuracy(meta: dict | None, variant: str) -> float | None:
    metrics = (meta or {}).get("metrics") or {}
    last = metrics.get("last") or {}
    key = "plain" if variant == "student" and "plain" in last else variant
    value = last.get(key)
    return float(value) if isinstance(value, (int, float)) else None  # a detector's per-K metrics are dicts


# --------------------------------------------------------------------------------------------------- estimate
def quick_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` certainly cannot run here, found without building anything (None: it may run)."""
    return BENCH_BACKENDS[backend].unavailable(device)


def estimate(source: Source, s: BenchSettings, device: torch.device, variants: list[str]) -> float:
    """Seconds the run should take: time each eager variant once per batch (after one warm call; other backends
    are rarely slower than eager), times the calls asked for, plus the usual build cost of each backend that can
    run here."""
    per_call = {(v, b): _one_call_s(source, v, b, device) for v in variants for b in s.batches}
    total = 0.0
    for backend in s.backends:
        if quick_unavailable(backend, device):
            continue
        entry = BENCH_BACKENDS[backend]
        for _ in s.precisions:
            for v in variants:
                total += entry.build_cost.get(device.type, 0.0) * (len(s.batches) if entry.build_per_batch else 1)
                total += sum(per_call[(v, b)] * (s.warmup + s.iters) for b in s.batches)
    return total


def _one_call_s(source: Source, variant: str, batch: int, device: torch.device) -> float:
    """Seconds of one eager call of ``variant`` at ``batch`` (an export folder without its artifact: a guess)."""
    if source.model is None:
        return 0.005 * batch
    module = source_module(source, variant).to(device)
    x = torch.rand((batch, *input_shape(source)), device=device)
    with torch.inference_mode():
        return time_callable(lambda: module(x), device, warmup=1, iters=1)[0] / 1e3


def plan_line(s: BenchSettings, variants: list[str], device: torch.device, estimate_s: float) -> str:
    """The line printed before anything runs: how many measurements, of what, and how long they should take."""
    n_rows = len(s.backends) * len(s.precisions) * len(variants) * len(s.batches)
    took = f"{estimate_s:.0f} s" if estimate_s < 120 else f"{estimate_s / 60:.1f} min"
    return (f"bench: {n_rows} measurements ({', '.join(s.backends)} x {', '.join(s.precisions)} x "
            f"{', '.join(variant_label(v) for v in variants)} x batch {', '.join(map(str, s.batches))}), "
            f"{s.warmup} warm-up + {s.iters} timed calls each on {device.type}; estimate ~{took}.")
