"""The accuracy benchmark's statistics and bookkeeping (benchmarks/accuracy_stats.py, benchmarks/accuracy.py):
the paired t-test and the exact sign-flip test against hand computations, no p-value below 3 seeds or at zero
spread, ties, the Holm correction over the rows, the convergence judgement at the same LR fraction, the table, the
Pareto input that benchmarks/pareto.py reads, a second call with other rows adding to the same results file, the
core protocol and scripts/gpu_accuracy.sh's plan, and the LS sources' dates."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from benchmarks import accuracy_stats as stats  # noqa: E402
from benchmarks.accuracy_stats import convergence, headline, markdown, paired, pareto_input  # noqa: E402


def run(row, seed, top1, method=None, encoder=None, curve=None, lr=1.0):
    """A saved run; ``lr``: LR / peak LR per epoch (a list), one number for every epoch, or None (not recorded)."""
    lrs = lr if isinstance(lr, list) else [lr] * len(curve or [])
    history = [{"epoch": i + 1, "top1": {"plain": v}, **({} if f is None else {"lr_fraction": f})}
               for i, (v, f) in enumerate(zip(curve or [], lrs))]
    return {"row": row, "seed": seed, "method": method or row, "encoder": encoder, "top1": top1, "best": top1,
            "seconds": 10.0, "settings": f"{row} settings", "history": history}


def results_of(runs, rows):
    return {"protocol": {"name": "cpu", "description": "test", "student": "resnet8", "epochs": 6},
            "seeds": sorted({r["seed"] for r in runs}), "rows": rows, "runs": runs,
            "teacher": {"arch": "wrn_16_2", "accuracy": 88.0, "curve": [80.0, 85.0, 88.0]}}


def test_headline_is_the_largest_k_or_the_plain_student():
    assert headline({"top1": {"1": 80.0, "8": 82.0, "0": 70.0}}) == 82.0
    assert headline({"top1": {"plain": 79.0}}) == 79.0
    assert headline({"top1": {"0": 70.0, "1": 71.0}}) == 71.0


def test_paired_t_test_matches_a_hand_computation():
    """Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3); with 2 degrees of freedom the t CDF is
    1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p = 1 - t / sqrt(2 + t^2) = 0.0742."""
    rows = {"fmkt": [run("fmkt", s, {"8": 80.0 + s}) for s in range(3)],
            "kd": [run("kd", s, {"plain": 79.0}) for s in range(3)]}
    # reference - row per seed: (80 - 79), (81 - 79), (82 - 79) = 1, 2, 3
    got = paired(rows, "kd")
    t = 2.0 / (1.0 / math.sqrt(3.0))
    assert got["seeds"] == [0, 1, 2] and got["mean"] == 2.0 and got["std"] == 1.0
    assert got["p"] == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), abs=1e-4)
    assert got["verdict"] == "FM-KT ahead (not significant at 0.05)"


def test_paired_uses_only_the_seeds_both_rows_have_and_says_behind():
    rows = {"fmkt": [run("fmkt", s, {"8": 80.0}) for s in range(4)],
            "dkd": [run("dkd", s, {"plain": 85.0 + 0.1 * s}) for s in (1, 2, 3, 7)]}
    got = paired(rows, "dkd")
    assert got["seeds"] == [1, 2, 3]
    assert got["mean"] == pytest.approx(-5.2) and got["verdict"] == "FM-KT behind (p < 0.05)"
    assert paired(rows, "fmkt") is None  # the reference is not compared with itself
    assert paired({"fmkt": rows["fmkt"], "kd": [run("kd", 0, {"plain": 1.0})]}, "kd") is None  # one seed: no test


def test_convergence_judges_the_last_five_epochs():
    flat = convergence(run("kd", 0, {"plain": 85.0}, curve=[60, 70, 84.9, 85.0, 85.1, 85.0, 85.05]))
    moving = convergence(run("kd", 0, {"plain": 85.0}, curve=[60, 70, 80, 82, 83, 84, 85]))
    assert flat["converged"] and flat["range"] == pytest.approx(0.2)
    assert not moving["converged"] and moving["net"] == pytest.approx(5.0)
    assert convergence(run("kd", 0, {"plain": 85.0}, curve=[80, 81])) is None  # too short to judge


def test_table_and_pareto_input_read_by_the_pareto_tool(tmp_path):
    pareto = pytest.importorskip("benchmarks.pareto")
    runs = [run("none", s, {"plain": 80.0 + s}) for s in range(2)]
    runs += [run("kd", s, {"plain": 82.0 + s}) for s in range(2)]
    runs += [run("kd+ls", s, {"plain": 83.0 + s}, method="kd") for s in range(2)]
    runs += [run("fmkt", s, {"1": 84.0, "8": 85.0 + s}, encoder="conv") for s in range(2)]
    runs += [run("theta dwconv", s, {"0": 81.0, "2": 83.5 + s}, method="theta", encoder="dwconv") for s in range(2)]
    results = results_of(runs, ["none", "kd", "kd+ls", "fmkt", "theta dwconv"])
    table = markdown(results)
    assert "| kd | 2 | 82.50 ± 0.71 |" in table and "| fmkt | 2 |  | 84.00 ± 0.00 |" in table
    # FM-KT minus KD: 3 on both seeds, so two seeds and zero spread: no p-value, and the reason said
    assert "| +3.00 ± 0.00 (n = 2) | n/a (n < 3) | n/a (n < 3) | FM-KT ahead (no test: n < 3) |" in table
    assert "p = 0.000" not in table and "(p < 0.05)" not in table
    doc = pareto_input(results)
    path = tmp_path / "acc.json"
    path.write_text(json.dumps(doc))
    acc = pareto.load_accuracy(str(path), "theta")
    assert acc.alone == (80.5, pytest.approx(0.707, abs=1e-3), 2)
    assert set(acc.baselines) == {"kd"}  # kd+ls is a variant, not the plain baseline; fmkt rows are flow points
    assert acc.points[("dwconv", 2)][0] == 84.0 and acc.points[("dwconv", 0)][0] == 81.0


def test_a_second_call_with_other_rows_adds_to_the_same_file(tmp_path, monkeypatch):
    """benchmarks/accuracy.py --rows A, then --rows B on the same --out: one file with both rows, both commands,
    runs already in the file are not trained again."""
    trained = []

    def fake_run(job):
        trained.append((job["row"], job["seed"]))
        return run(job["row"], job["seed"], {"plain": 80.0 + job["seed"]}, method=job["method"]["name"])

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    monkeypatch.setattr(accuracy, "teacher_record", lambda p, args, console: {"arch": "wrn_16_2", "accuracy": 88.0,
                                                                             "curve": [88.0]})
    out = tmp_path / "acc.json"
    common = ["--protocol", "cpu", "--seeds", "0,1", "--out", str(out), "--work", str(tmp_path / "w")]
    assert accuracy.main(common + ["--rows", "none,kd"]) == 0
    assert accuracy.main(common + ["--rows", "kd,dkd"]) == 0
    doc = json.loads(out.read_text())
    assert doc["rows"] == ["none", "kd", "dkd"] and doc["seeds"] == [0, 1] and len(doc["commands"]) == 2
    assert trained == [("none", 0), ("kd", 0), ("none", 1), ("kd", 1), ("dkd", 0), ("dkd", 1)]
    assert sorted((r["row"], r["seed"]) for r in doc["runs"]) == sorted(trained)
    assert "| dkd | 2 |" in out.with_suffix(".md").read_text()


def test_best_d_is_chosen_on_held_out_images_and_runs_with_its_own_parameters(tmp_path, monkeypatch):
    """The "fmkt (best D)" row: every registered D trained once on seed 0 with data.holdout (never the test split),
    the best held-out top-1 at K = 8 wins; the row then runs FM-KT's published choices with that D, whose
    parameters are its own (DIST's published beta/gamma/tau are not handed to another loss)."""
    from fmkt.losses import LOSSES

    jobs = []
    held_out = {d: 80.0 + i for i, d in enumerate(LOSSES)}
    held_out["kd"] = 99.0  # kd wins

    def fake_run(job):
        jobs.append(job)
        if job["row"] == "select mse":  # a D that diverges: recorded with its reason, the others still compared
            return {"row": job["row"], "seed": 0, "method": "fmkt", "failed": "the loss became inf", "top1": {},
                    "settings": ""}
        top = held_out[job["method"]["loss"]] if job["row"].startswith("select") else 85.0
        return run(job["row"], job["seed"], {"8": top}, method="fmkt", encoder="conv")

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    monkeypatch.setattr(accuracy, "teacher_record", lambda p, args, console: {"arch": "wrn_16_2", "accuracy": 88.0,
                                                                             "curve": [88.0]})
    out = tmp_path / "acc.json"
    assert accuracy.main(["--protocol", "cpu", "--seeds", "0,1", "--rows", "fmkt (best D)", "--out", str(out),
                          "--work", str(tmp_path / "w")]) == 0
    selection = [j for j in jobs if j["row"].startswith("select")]
    assert sorted(j["method"]["loss"] for j in selection) == sorted(LOSSES)
    assert all(j["data"] == {"holdout": accuracy.PROTOCOLS["cpu"].holdout} and j["seed"] == 0 for j in selection)
    final = [j for j in jobs if j["row"] == "fmkt (best D)"]
    assert [j["seed"] for j in final] == [0, 1]
    assert final[0]["method"]["loss"] == "kd" and "loss_params" not in final[0]["method"]
    assert final[0]["method"]["schedule"] == "rectified" and final[0]["method"]["train_steps"] == "8"
    assert accuracy.fmkt_with("dist")["loss_params"] == {"beta": 2.0, "gamma": 2.0, "tau": 1.0}
    selection_record = json.loads(out.read_text())["selection"]
    assert selection_record["best"] == "kd" and selection_record["holdout_top1"]["mse"] is None
    assert selection_record["failed"] == {"mse": "the loss became inf"}
    assert "mse failed (the loss became inf)" in out.with_suffix(".md").read_text()


def rows_with_differences(**diffs):
    """FM-KT at 80 + seed on seeds 0..n-1; each named row below it by the given differences (reference - row)."""
    n = len(next(iter(diffs.values())))
    rows = {"fmkt": [run("fmkt", s, {"8": 80.0 + s}) for s in range(n)]}
    for name, ds in diffs.items():
        rows[name] = [run(name, s, {"plain": 80.0 + s - d}) for s, d in enumerate(ds)]
    return rows


def test_two_seeds_give_no_p_value_whatever_their_differences():
    """Two seeds with equal differences once printed "p = 0.000, FM-KT ahead (p < 0.05)": no test at n < 3."""
    got = paired(rows_with_differences(kd=[3.0, 3.0]), "kd")
    assert got["p"] is None and got["verdict"] == "FM-KT ahead (no test: n < 3)"
    assert got["n"] == 2 and got["mean"] == 3.0 and got["std"] == 0.0
    assert got["p_exact"] is None and got["no_test"] == "n < 3"
    spread = paired(rows_with_differences(kd=[1.0, 3.0]), "kd")  # a spread does not make 2 seeds testable
    assert spread["p"] is None and spread["no_test"] == "n < 3"


def test_zero_spread_gives_no_p_value():
    """Three seeds, FM-KT 3 points ahead on each (80.1 - 77.1 and the like are 3 only up to float rounding)."""
    rows = {"fmkt": [run("fmkt", s, {"8": 80.1 + s}) for s in range(3)],
            "kd": [run("kd", s, {"plain": 77.1 + s}) for s in range(3)]}
    got = paired(rows, "kd")
    assert got["p"] is None and got["verdict"] == "FM-KT ahead (no test: zero spread)"
    assert got["p_exact"] is None and got["no_test"] == "zero spread"


def test_a_tie_reads_tie_not_behind():
    got = paired(rows_with_differences(kd=[1.0, -1.0, 0.0]), "kd")
    assert got["verdict"] == "tie (not significant at 0.05)"
    assert got["mean"] == 0.0 and got["direction"] == "tie" and got["p"] == pytest.approx(1.0)
    same = paired(rows_with_differences(kd=[0.0, 0.0, 0.0]), "kd")  # e.g. "fmkt (best D)" choosing FM-KT's own D
    assert same["verdict"] == "tie (no test: zero spread)"


def test_exact_sign_flip_p_matches_a_hand_count():
    """|sum| over the 2^n sign flips. 1, 2, 3: only +++ and --- reach |6|, 2/8. 3, 1, -1, 2 (sum 5; |sum| >= 5 for
    all-plus 7 and either 1 flipped, 5, and their negatives): 6/16."""
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert stats.sign_flip_p([3.0, 1.0, -1.0, 2.0]) == 6 / 16
    assert stats.sign_flip_p([0.5, -0.5, 0.0]) == 1.0
    got = paired(rows_with_differences(kd=[3.0, 1.0, -1.0, 2.0]), "kd")
    assert got["p_exact"] == 6 / 16


def t_p(t):
    """Two-sided p of t on 2 degrees of freedom (test_paired_t_test_matches_a_hand_computation)."""
    return 1.0 - t / math.sqrt(2.0 + t * t)


def test_holm_adjusts_over_the_rows_and_the_verdict_reads_the_adjusted_p():
    """Three rows against FM-KT, raw t-test p 0.020, 0.035 and 0.074 (differences 3,4,5; 2,3,4; 1,2,3: sd 1, t =
    mean * sqrt 3). Holm: 3 x 0.020, then max(that, 2 x 0.035), then max(that, 0.074). Two rows under 0.05 alone,
    none after the correction."""
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    rows = rows_with_differences(kd=[3.0, 4.0, 5.0], dkd=[2.0, 3.0, 4.0], dist=[1.0, 2.0, 3.0])
    raw = {n: t_p(m * math.sqrt(3.0)) for n, m in (("kd", 4.0), ("dkd", 3.0), ("dist", 2.0))}
    assert paired(rows, "kd")["verdict"] == "FM-KT ahead (p < 0.05)"  # alone, as a family of one
    table = markdown(results_of([r for name in ("fmkt", "kd", "dkd", "dist") for r in rows[name]],
                                ["kd", "dkd", "dist", "fmkt"]))
    assert "| +4.00 ± 1.00 (n = 3) | 0.020 (0.061) | 0.250 (0.750) | FM-KT ahead (not significant at 0.05 after " \
           "Holm) |" in table
    assert "Holm-adjusted p over the 3 rows" in table
    got = stats.compare(rows, ["kd", "dkd", "dist"])
    assert {n: c["p"] for n, c in got.items()} == pytest.approx(raw, abs=1e-9)
    holm = {"kd": 3 * raw["kd"], "dkd": 2 * raw["dkd"], "dist": raw["dist"]}
    assert {n: c["p_holm"] for n, c in got.items()} == pytest.approx(holm, abs=1e-9)
    assert all(c["verdict"] == "FM-KT ahead (not significant at 0.05 after Holm)" for c in got.values())
    assert got["kd"]["p_exact_holm"] == 0.75 and got["dist"]["p_exact"] == 0.25  # 3 x 2/8; one 2/8


def cosine(epochs):
    return [0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(1, epochs + 1)]


def test_convergence_is_judged_at_the_same_lr_fraction_not_after_annealing():
    """20 epochs of cosine: top-1 still climbing a point per epoch until epoch 15, flat over the last 5 only because
    the LR has annealed to ~0. Judged on the last 5 epochs it looked converged; judged on the last 5 epochs at LR >=
    0.5 x peak (epochs 6-10, the same point of the schedule for every row) it is not."""
    climbing = [70.0 + e for e in range(15)] + [85.0, 85.1, 85.0, 85.05, 85.0]
    got = convergence(run("kd", 0, {"plain": 85.0}, curve=climbing, lr=cosine(20)))
    assert not got["converged"]
    assert got["epochs"] == [6, 10] and got["range"] == pytest.approx(4.0)
    plateau = [70.0, 80.0] + [85.0 + 0.1 * (e % 2) for e in range(18)]
    flat = convergence(run("kd", 0, {"plain": 85.0}, curve=plateau, lr=cosine(20)))
    assert flat["epochs"] == [6, 10] and flat["converged"]
    step = [1.0] * 15 + [0.1] * 5  # multistep: judged on the 5 epochs before the decay
    assert convergence(run("kd", 0, {"plain": 85.0}, curve=climbing, lr=step))["epochs"] == [11, 15]


def test_runs_saved_without_the_lr_fraction_are_read_with_the_recipe_cosine():
    """Results written before the fraction was recorded (the committed CPU protocol: 6 epochs of cosine) have 3
    epochs at LR >= 0.5 x peak: too few to judge, and the table says so instead of a range."""
    curve = [56.6, 66.2, 75.9, 77.3, 81.7, 82.3]
    assert convergence(run("none", 0, {"plain": 82.3}, curve=curve, lr=None), epochs=6) is None
    assert convergence(run("none", 0, {"plain": 82.3}, curve=curve, lr=None)) is None  # schedule unknown
    long = convergence(run("none", 0, {"plain": 85.0}, curve=[85.0] * 20, lr=None), epochs=20)
    assert long["epochs"] == [6, 10] and long["converged"]
    runs = [run(r, s, {"plain": 82.3}, curve=curve, lr=None) for r in ("none", "fmkt") for s in range(3)]
    table = markdown(results_of(runs, ["none", "fmkt"]))
    assert "| n/a (3 epochs at LR ≥ 0.5 × peak, 5 needed) |" in table


def test_accuracy_history_records_the_lr_fraction():
    from fmkt.config import build_config

    cfg = build_config("fashion-mnist", [{"train": {"epochs": 4}}])  # cosine, no warm-up
    entry = accuracy.history_entry({"epoch": 2, "top1": {"8": 80.0}, "images_per_s": 123.0, "train_loss": 1.0}, cfg)
    assert entry == {"epoch": 2, "top1": {"8": 80.0}, "images_per_s": 123.0, "lr_fraction": 0.5}
    assert accuracy.history_entry({"epoch": 3, "top1": {}}, cfg)["lr_fraction"] == pytest.approx(0.146447, abs=1e-6)


def test_core_protocol_is_the_five_rows_three_seeds_on_full_data():
    p = accuracy.PROTOCOLS["core"]
    assert p.rows == ("none", "kd", "dkd", "dist", "fmkt") and p.seeds == (0, 1, 2) and p.train_subset is None
    args = accuracy.parse_args(["--protocol", "core", "--epochs", "3", "--teacher-epochs", "5"])
    cfg = accuracy.base_config(p, args, 1, "out")
    assert cfg.train.epochs == 3 and cfg.teacher.epochs == 5 and cfg.data.train_subset is None
    assert cfg.train.seed == 1 and cfg.student == "resnet8"


def test_gpu_accuracy_core_plan_fits_eight_minutes(tmp_path):
    """scripts/gpu_accuracy.sh core's budget arithmetic, printed without running anything (PYTHON=false: no Python
    is started): the epochs every row gets and a planned total within the 480 s."""
    script = ROOT / "scripts" / "gpu_accuracy.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "GPU_ACCURACY_PLAN_ONLY": "1", "PYTHON": "false", "FMKT_BENCH_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), "core"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "epochs 3"
    assert "dkd     7005 img/s ->  8.57 s per epoch of 60000 images" in proc.stdout
    assert "one epoch of all 15 runs: 21.06 s x 3 seeds x 7/6 (evaluation) = 73.7 s" in proc.stdout
    total = float(proc.stdout.split("planned total ")[1].split(" s")[0])
    assert total <= 480.0


def test_ls_sources_say_their_logs_predate_the_code_they_are_read_with():
    """The LS authors' per-pair logs were committed 2024-03-01 to 03-12: before KD's CE weight became 0.1
    (2024-03-10) and before the DKD --logit-stand mapping changed (2024-05-18). Every LS source says so."""
    from fmkt.distillers.published import PUBLISHED

    kd, dkd = PUBLISHED["kd+ls"], PUBLISHED["dkd+ls"]
    for pair in [*kd.per_pair.values(), *dkd.per_pair.values()]:
        assert "predates the 2024-0" in pair.source
    assert "2024-03-10" in kd.source and "CE weight 1" in kd.source and "not evidence" in kd.source
    assert "2024-05-18" in dkd.source and "kd-weight^2" in dkd.source and "not evidence" in dkd.source
    for pair in kd.per_pair.values():
        assert "(committed 2024-03-0" in pair.source and "predates the 2024-03-10 change" in pair.source
    for pair in dkd.per_pair.values():
        assert "(committed 2024-03-" in pair.source and "predates the 2024-05-18 change" in pair.source
    assert "committed 2024-03-12, 37a90e7" in dkd.per_pair[("resnet56", "resnet20")].source
