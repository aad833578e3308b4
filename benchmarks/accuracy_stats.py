"""Summaries of the accuracy benchmark's runs: mean +- std per row and K, the paired difference of every row to
FM-KT over the same seeds with a paired t-test, whether the runs had converged, and the Markdown tables."""
from __future__ import annotations

import math
import statistics

KEYS = ["plain", "1", "2", "4", "8", "0"]
REFERENCE = "fmkt"  # the row every other one is compared with, seed by seed


def headline(run: dict) -> float | None:
    """A run's one number: top-1 at the largest K it has (plain for a plain student)."""
    top = run["top1"]
    for k in ("plain", "8", "4", "2", "1", "0"):
        if k in top:
            return top[k]
    return None


def convergence(run: dict, window: int = 5) -> dict | None:
    """How much the headline top-1 still moved over the last ``window`` evaluated epochs (range and net change,
    points): the judgement of "converged" is a range under 0.5 points and a net change under 0.3."""
    curve = [headline({"top1": h["top1"]}) for h in run.get("history", []) if "top1" in h]
    if len(curve) < window:
        return None
    tail = curve[-window:]
    rng, net = max(tail) - min(tail), tail[-1] - tail[0]
    return {"window": window, "range": round(rng, 3), "net": round(net, 3), "converged": rng < 0.5 and abs(net) < 0.3}


def paired(rows_runs: dict, name: str) -> dict | None:
    """Row ``name`` against REFERENCE on the seeds both have: mean +- std of (reference - row) and a paired t-test."""
    ref = {r["seed"]: headline(r) for r in rows_runs.get(REFERENCE, [])}
    own = {r["seed"]: headline(r) for r in rows_runs.get(name, [])}
    seeds = sorted(set(ref) & set(own))
    if name == REFERENCE or len(seeds) < 2:
        return None
    diffs = [ref[s] - own[s] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if sd == 0:
        p = 0.0 if mean != 0 else 1.0
    else:
        from scipy import stats

        p = float(stats.ttest_rel([ref[s] for s in seeds], [own[s] for s in seeds]).pvalue)
    return {"seeds": seeds, "mean": round(mean, 3), "std": round(sd, 3), "p": round(p, 4),
            "verdict": ("FM-KT ahead" if mean > 0 else "FM-KT behind") + (" (p < 0.05)" if p < 0.05 else
                                                                          " (not significant at 0.05)")}


def summarise(results: dict) -> list[dict]:
    by_row: dict = {}
    for r in results["runs"]:
        by_row.setdefault(r["row"], []).append(r)
    out = []
    for name in results.get("rows", list(by_row)):
        runs = by_row.get(name, [])
        if not runs:
            continue
        row = {"row": name, "seeds": len(runs), "seconds": statistics.mean(r["seconds"] for r in runs),
               "settings": runs[0].get("settings", ""), "vs_fmkt": paired(by_row, name),
               "converged": [c for c in (convergence(r) for r in runs) if c is not None]}
        for k in KEYS:
            vals = [r["top1"][k] for r in runs if k in r["top1"]]
            if vals:
                row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(row)
    return out


def _cell(row: dict, k: str) -> str:
    return f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if k in row else ""


def markdown(results: dict) -> str:
    p = results["protocol"]
    lines = ["| row | seeds | student | K=1 | K=2 | K=4 | K=8 | theta (K=0) | FM-KT minus row (paired) | "
             "last-5-epoch range | s / run |", "|" + "---|" * 11]
    for row in summarise(results):
        vs = row["vs_fmkt"]
        paired_cell = f"{vs['mean']:+.2f} ± {vs['std']:.2f}, p = {vs['p']:.3f}" if vs else ""
        conv = row["converged"]
        conv_cell = f"{max(c['range'] for c in conv):.2f}" if conv else "n/a"
        lines.append(f"| {row['row']} | {row['seeds']} | " + " | ".join(_cell(row, k) for k in KEYS)
                     + f" | {paired_cell} | {conv_cell} | {row['seconds']:.0f} |")
    t = results["teacher"]
    curve = ", ".join(f"{v:.1f}" for v in t.get("curve", [])[-5:])
    settings = "\n".join(f"- `{r['row']}`: {r['settings']}" for r in summarise(results) if r["settings"])
    sel = results.get("selection")
    sel_line = (f"\nFM-KT's loss D chosen on {sel['holdout']} held-out training images (seed 0, K = 8): "
                + ", ".join(f"{d} {v:.2f}" if v is not None else f"{d} failed ({sel.get('failed', {}).get(d, '?')})"
                            for d, v in sel["holdout_top1"].items()) + f" -> **{sel['best']}**.\n"
                if sel else "")
    return (f"Protocol **{p['name']}** ({p['description']}). Teacher {t['arch']}: {t['accuracy']:.2f} % top-1 "
            f"(last epochs of its curve: {curve}). Student {p['student']}, {p['epochs']} epochs, seeds "
            f"{results['seeds']}; mean ± std of top-1 (%) on the test split; the paired column is FM-KT's top-1 "
            "minus the row's on the same seeds (K = 8 for flow rows, the plain student otherwise) with a paired "
            "t-test; the range column is the largest spread of top-1 over a run's last 5 epochs.\n"
            + sel_line + "\n" + "\n".join(lines) + "\n\nSettings per row:\n" + settings + "\n")


def pareto_input(results: dict) -> dict:
    """The accuracy file benchmarks/pareto.py reads (its docstring): theta rows per encoder and K, the student
    alone and the baselines, mean +- std over seeds. The "theta" row is the conv encoder's."""
    rows = []
    for row in summarise(results):
        runs = [r for r in results["runs"] if r["row"] == row["row"]]
        method = runs[0].get("method", row["row"].split()[0].split("+")[0])
        encoder = runs[0].get("encoder")
        for k in KEYS:
            if k not in row:
                continue
            entry = {"method": method, "mean": round(row[k][0], 3), "std": round(row[k][1], 3), "n": row["seeds"]}
            if k != "plain":
                entry.update(encoder=encoder or "conv", key=k)
            elif row["row"] != method:
                continue  # a variant (e.g. kd+ls) is not the plain baseline of its method
            rows.append(entry)
    return {"student": results["protocol"]["student"], "dataset": "fashion-mnist", "protocol": results["protocol"],
            "rows": rows}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
