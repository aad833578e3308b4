"""The accuracy file benchmarks/pareto.py reads (``--accuracy FILE``), checked, as :class:`Accuracy`.

A JSON object:

    {"student": "resnet8x4",                # optional: the student the numbers belong to; only that student's
                                            #   table shows them (absent: every student's, with a note)
     "dataset": "cifar100", "protocol": "240 epochs, 3 seeds",     # optional, printed with the table
     "rows": [
       {"method": "theta", "encoder": "dwconv", "K": 2, "mean": 74.10, "std": 0.21, "n": 3},
       {"method": "theta", "encoder": "conv", "key": "0", "mean": 73.90, "std": 0.30},
       {"method": "none", "mean": 72.50, "std": 0.31},             # no encoder: the student alone
       {"method": "dkd", "mean": 76.32, "std": 0.18}]}             # no encoder: a baseline

Top-1 in %. A row with an ``encoder`` is the point (encoder, K); K is ``"K"`` (an int) or ``"key"`` (fmkt.json's
metrics key, "0" = the theta head); only rows of ``--method`` (default theta, the method of the timed artifacts)
are used, others are listed as ignored. ``std`` and ``n`` (seeds) are optional. A row without an encoder is a
plain student of the same architecture (same latency as the student alone): method ``none`` is the student
alone, any other is a baseline, and the best baseline is the one with the highest mean.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fmkt.errors import FmktError
from fmkt.flow.encoders import ENCODERS


@dataclass
class Accuracy:
    """The accuracy file, sorted: points[(encoder, K)], the student alone and the baselines, as (mean, std, n)."""
    source: str
    method: str
    student: str | None = None
    dataset: str | None = None
    protocol: str | None = None
    points: dict = field(default_factory=dict)
    alone: tuple | None = None
    baselines: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)

    def best_baseline(self) -> tuple[str, tuple] | None:
        return max(self.baselines.items(), key=lambda kv: kv[1][0]) if self.baselines else None

    def applies_to(self, student: str) -> bool:
        return self.student is None or self.student == student


def _number(row: dict, key: str, where: str, required: bool = True) -> float | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FmktError(f"{where}: {key!r} must be a number, got {value!r}.")
    return float(value)


def _steps_of(row: dict, where: str) -> int:
    raw = row.get("K", row.get("key"))
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise FmktError(f"{where}: a row with an encoder needs \"K\" (an int) or \"key\" (\"0\", \"1\", ...), "
                        f"got {raw!r}.") from None
    if k < 0:
        raise FmktError(f"{where}: K must be >= 0, got {k}.")
    return k


def load_accuracy(path: str, method: str) -> Accuracy:
    """Read and check ``--accuracy FILE`` (the format is in the module docstring); errors are one sentence."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise FmktError(f"--accuracy {path}: cannot read it ({exc.strerror or exc}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmktError(f"--accuracy {path} is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise FmktError(f"--accuracy {path} must be a JSON object with a \"rows\" list (see "
                        "benchmarks/pareto_accuracy.py).")
    acc = Accuracy(str(p), method, doc.get("student"), doc.get("dataset"), doc.get("protocol"))
    for i, row in enumerate(doc["rows"]):
        where = f"--accuracy {path}, row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise FmktError(f"{where}: each row is an object with a \"method\" name.")
        value = (_number(row, "mean", where), _number(row, "std", where, False), row.get("n"))
        encoder = row.get("encoder")
        if encoder is None or row.get("key") == "plain":
            if row["method"] == "none":
                acc.alone = value
            else:
                acc.baselines[row["method"]] = value
        elif encoder not in ENCODERS:
            acc.ignored.append(f"row {i}: encoder {encoder!r} is not registered here")
        elif row["method"] != method:
            acc.ignored.append(f"row {i}: method {row['method']} (the flow points are --method {method})")
        else:
            acc.points[(encoder, _steps_of(row, where))] = value
    return acc


def fmt_acc(value: tuple | None) -> str:
    if value is None:
        return "not measured"
    mean, std, n = value
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + (f" (n={n})" if n else "")


def accuracy_lines(acc: Accuracy | None) -> list[str]:
    if acc is None:
        return ["Accuracy: not measured (no `--accuracy FILE`); the table is latency only.", ""]
    lines = [f"Accuracy: {acc.source} (method {acc.method}; student {acc.student or 'not stated'}; dataset "
             f"{acc.dataset or 'not stated'}; protocol {acc.protocol or 'not stated'}); top-1 mean ± std over seeds."]
    lines += [f"- ignored: {line}" for line in acc.ignored]
    return lines + [""]


def accuracy_json(acc: Accuracy | None) -> dict:
    if acc is None:
        return {"measured": False}
    return {"measured": True, "file": acc.source, "method": acc.method, "student": acc.student,
            "dataset": acc.dataset, "protocol": acc.protocol, "ignored": acc.ignored}
