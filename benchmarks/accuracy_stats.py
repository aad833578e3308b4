"""Summaries of the accuracy benchmark's runs: mean +- std per row and K; every row against FM-KT on the seeds both
have (mean +- std of the paired differences, a paired t-test and an exact sign-flip test, each Holm-adjusted over the
rows compared with FM-KT); how much each run's top-1 still moved at the same fraction of the LR schedule; the
Markdown tables."""
from __future__ import annotations

import itertools
import math
import statistics

KEYS = ["plain", "1", "2", "4", "8", "0"]
REFERENCE = "fmkt"  # the row every other one is compared with, seed by seed
ALPHA = 0.05
# Fewer paired seeds give no p-value: a t-test on 1 degree of freedom, and an exact test whose smallest p is 0.5.
MIN_SEEDS = 3
# Top-1 is recorded in steps of 0.01 points, so a non-zero mean (or spread) of n differences is at least ~0.01 / n:
# below 1e-9 is float rounding, read as exactly 0 (a tie; a zero spread).
ZERO = 1e-9
EXACT_MAX_SEEDS = 20  # the exact test enumerates 2^n sign assignments
# Convergence is judged on the epochs at which the LR was still at least this fraction of its peak, the same for
# every row: near the end of a cosine schedule the LR is ~0 and top-1 stops moving whether or not training had
# converged, so the last epochs of a run cannot tell.
LR_FLOOR = 0.5
WINDOW = 5


def headline(run: dict) -> float | None:
    """A run's one number: top-1 at the largest K it has (plain for a plain student)."""
    top = run["top1"]
    for k in ("plain", "8", "4", "2", "1", "0"):
        if k in top:
            return top[k]
    return None


def cosine_fraction(epoch: float, epochs: int) -> float:
    """LR / peak LR after ``epoch`` of ``epochs`` epochs of a cosine schedule without warm-up (fmkt.optim.lr_factor):
    the schedule of every run benchmarks/accuracy.py made before it recorded the fraction per epoch."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))


def epochs_at_lr(run: dict, lr_floor: float = LR_FLOOR, epochs: int | None = None) -> list | None:
    """[(epoch, headline top-1)] of the evaluated epochs at which LR >= ``lr_floor`` x its peak, in order. The
    fraction is the history's ``lr_fraction``; without it, a cosine over ``epochs``; None when neither is known."""
    out = []
    for h in run.get("history", []):
        top = headline({"top1": h.get("top1", {})})
        if top is None:
            continue
        frac = h.get("lr_fraction")
        if frac is None:
            if not epochs:
                return None
            frac = cosine_fraction(h["epoch"], epochs)
        if frac >= lr_floor - ZERO:
            out.append((h["epoch"], top))
    return out


def convergence(run: dict, window: int = WINDOW, lr_floor: float = LR_FLOOR, epochs: int | None = None) -> dict | None:
    """How much the headline top-1 still moved over the last ``window`` evaluated epochs at LR >= ``lr_floor`` x its
    peak (range and net change, points): "converged" is a range under 0.5 points and a net change under 0.3. None
    when fewer than ``window`` such epochs exist or the LR schedule is unknown (see epochs_at_lr)."""
    points = epochs_at_lr(run, lr_floor, epochs)
    if points is None or len(points) < window:
        return None
    tail = [top for _, top in points[-window:]]
    rng, net = max(tail) - min(tail), tail[-1] - tail[0]
    return {"window": window, "lr_floor": lr_floor, "epochs": [points[-window][0], points[-1][0]],
            "range": round(rng, 3), "net": round(net, 3), "converged": rng < 0.5 and abs(net) < 0.3}


def sign_flip_p(diffs: list) -> float:
    """Exact two-sided p of the paired sign-flip permutation test: the share of the 2^n sign assignments to the
    differences whose |sum| is at least the observed |sum| (valid at any n; its smallest value is 2 / 2^n)."""
    if len(diffs) > EXACT_MAX_SEEDS:
        raise ValueError(f"the exact test enumerates 2^n sign flips; n = {len(diffs)} > {EXACT_MAX_SEEDS}")
    observed = abs(sum(diffs))
    flips = list(itertools.product((1.0, -1.0), repeat=len(diffs)))
    hits = sum(1 for signs in flips if abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - ZERO)
    return hits / len(flips)


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values of a family of tests {name: p}: the i-th smallest (from 0) times (m - i),
    made non-decreasing in that order, capped at 1."""
    adjusted, running, m = {}, 0.0, len(pvalues)
    for i, name in enumerate(sorted(pvalues, key=pvalues.get)):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def verdict(direction: str, p: float | None, no_test: str | None, family: int = 1) -> str:
    """"FM-KT ahead" / "FM-KT behind" / "tie", and whether ``p`` (Holm-adjusted when ``family`` > 1) is under ALPHA."""
    head = "tie" if direction == "tie" else f"FM-KT {direction}"
    if no_test:
        return f"{head} (no test: {no_test})"
    if family > 1:
        return head + (f" (Holm p < {ALPHA})" if p < ALPHA else f" (not significant at {ALPHA} after Holm)")
    return head + (f" (p < {ALPHA})" if p < ALPHA else f" (not significant at {ALPHA})")


def paired(rows_runs: dict, name: str) -> dict | None:
    """Row ``name`` against REFERENCE on the seeds both have: mean +- std of (reference - row), a paired t-test and
    the exact sign-flip test (p None, with the reason in ``no_test``, below MIN_SEEDS seeds or at zero spread), and
    the verdict for this row alone (compare() corrects it for the other rows). None below 2 shared seeds."""
    ref = {r["seed"]: headline(r) for r in rows_runs.get(REFERENCE, [])}
    own = {r["seed"]: headline(r) for r in rows_runs.get(name, [])}
    seeds = sorted(set(ref) & set(own))
    if name == REFERENCE or len(seeds) < 2:
        return None
    diffs = [ref[s] - own[s] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    no_test = f"n < {MIN_SEEDS}" if len(seeds) < MIN_SEEDS else "zero spread" if sd < ZERO else None
    p = p_exact = None
    if no_test is None:
        from scipy import stats

        p = float(stats.ttest_rel([ref[s] for s in seeds], [own[s] for s in seeds]).pvalue)
        p_exact = sign_flip_p(diffs)
    direction = "tie" if abs(mean) < ZERO else "ahead" if mean > 0 else "behind"
    return {"seeds": seeds, "n": len(seeds), "mean": round(mean, 3), "std": round(sd, 3), "p": p,
            "p_exact": p_exact, "no_test": no_test, "direction": direction,
            "verdict": verdict(direction, p, no_test)}


def compare(rows_runs: dict, names=None) -> dict:
    """paired() for every row against REFERENCE, with both p-values Holm-adjusted over the rows that have one
    (``p_holm``, ``p_exact_holm``) and the verdict read from the adjusted t-test p."""
    out = {n: c for n in (names if names is not None else list(rows_runs))
           if (c := paired(rows_runs, n)) is not None}
    for key in ("p", "p_exact"):
        adjusted = holm({n: c[key] for n, c in out.items() if c[key] is not None})
        for n, c in out.items():
            c[key + "_holm"] = adjusted.get(n)
    family = sum(1 for c in out.values() if c["p"] is not None)
    for c in out.values():
        c["family"] = family
        c["verdict"] = verdict(c["direction"], c["p_holm"], c["no_test"], family)
    return out


def summarise(results: dict) -> list[dict]:
    by_row: dict = {}
    for r in results["runs"]:
        by_row.setdefault(r["row"], []).append(r)
    names = [n for n in results.get("rows", list(by_row)) if by_row.get(n)]
    versus = compare(by_row, names)
    epochs = results.get("protocol", {}).get("epochs")
    out = []
    for name in names:
        runs = by_row[name]
        row = {"row": name, "seeds": len(runs), "seconds": statistics.mean(r["seconds"] for r in runs),
               "settings": runs[0].get("settings", ""), "vs_fmkt": versus.get(name),
               "converged": [c for c in (convergence(r, epochs=epochs) for r in runs) if c is not None],
               "epochs_at_lr": [epochs_at_lr(r, epochs=epochs) for r in runs]}
        for k in KEYS:
            vals = [r["top1"][k] for r in runs if k in r["top1"]]
            if vals:
                row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(row)
    return out


def _cell(row: dict, k: str) -> str:
    return f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if k in row else ""


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _test_cells(vs: dict | None) -> list[str]:
    """The paired difference, t-test p (Holm), exact p (Holm) and verdict cells of one row."""
    if not vs:
        return ["", "", "", ""]
    diff = f"{vs['mean']:+.2f} ± {vs['std']:.2f} (n = {vs['n']})"
    if vs["no_test"]:
        na = f"n/a ({vs['no_test']})"
        return [diff, na, na, vs["verdict"]]
    return [diff, f"{_p(vs['p'])} ({_p(vs['p_holm'])})", f"{_p(vs['p_exact'])} ({_p(vs['p_exact_holm'])})",
            vs["verdict"]]


def _convergence_cell(row: dict) -> str:
    conv = row["converged"]
    if conv:
        worst = max(conv, key=lambda c: c["range"])
        a, b = worst["epochs"]
        return (f"{worst['range']:.2f} (epochs {a}-{b}); {sum(c['converged'] for c in conv)}/{len(conv)} "
                "converged")
    counts = [len(p) for p in row["epochs_at_lr"] if p is not None]
    if not counts:
        return "n/a (LR schedule not recorded)"
    n = max(counts)
    return f"n/a ({n} epoch{'' if n == 1 else 's'} at LR ≥ {LR_FLOOR:g} × peak, {WINDOW} needed)"


def markdown(results: dict) -> str:
    p = results["protocol"]
    lines = ["| row | seeds | student | K=1 | K=2 | K=4 | K=8 | theta (K=0) | FM-KT minus row (paired) | "
             "t-test p (Holm) | exact p (Holm) | verdict | top-1 range at LR ≥ 0.5 × peak | s / run |",
             "|" + "---|" * 14]
    rows = summarise(results)
    for row in rows:
        lines.append(f"| {row['row']} | {row['seeds']} | " + " | ".join(_cell(row, k) for k in KEYS) + " | "
                     + " | ".join(_test_cells(row["vs_fmkt"])) + f" | {_convergence_cell(row)} | "
                     f"{row['seconds']:.0f} |")
    family = next((r["vs_fmkt"]["family"] for r in rows if r["vs_fmkt"]), 0)
    t = results["teacher"]
    curve = ", ".join(f"{v:.1f}" for v in t.get("curve", [])[-5:])
    settings = "\n".join(f"- `{r['row']}`: {r['settings']}" for r in rows if r["settings"])
    sel = results.get("selection")
    sel_line = (f"\nFM-KT's loss D chosen on {sel['holdout']} held-out training images (seed 0, K = 8): "
                + ", ".join(f"{d} {v:.2f}" if v is not None else f"{d} failed ({sel.get('failed', {}).get(d, '?')})"
                            for d, v in sel["holdout_top1"].items()) + f" -> **{sel['best']}**.\n"
                if sel else "")
    subset = f" Training subset: {p['train_subset']:,} images." if p.get("train_subset") else ""
    return (f"Protocol **{p['name']}** ({p['description']}).{subset} Teacher {t['arch']}: {t['accuracy']:.2f} % top-1 "
            f"(last epochs of its curve: {curve}). Student {p['student']}, {p['epochs']} epochs, seeds "
            f"{results['seeds']}; mean ± std of top-1 (%) on the test split. The paired columns compare FM-KT's "
            "top-1 with the row's on the same seeds (K = 8 for flow rows, the plain student otherwise): mean ± "
            "std of the differences (positive: FM-KT ahead; exactly 0: a tie), a two-sided paired t-test and an "
            "exact two-sided sign-flip permutation test (all 2^n sign assignments; its smallest possible p is "
            "2 / 2^n, 0.25 at 3 seeds and 0.0625 at 5, so below 6 seeds it cannot reach 0.05), each with its "
            f"Holm-adjusted p over the {family} rows tested against FM-KT in brackets; the verdict reads the "
            f"Holm-adjusted t-test p at {ALPHA}. No p-value below {MIN_SEEDS} seeds or when the differences have "
            "zero spread (n/a, with the reason). The range column is the largest spread of top-1 over a run's "
            f"last {WINDOW} evaluated epochs at which the LR was still ≥ {LR_FLOOR:g} × its peak (the same point "
            "of the schedule for every row; converged: range < 0.5 and net change < 0.3 points), so the LR "
            "annealing to 0 at the end cannot make a run look converged; n/a when the run has fewer such epochs.\n"
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
