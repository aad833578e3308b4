"""The accuracy benchmark's statistics and bookkeeping (benchmarks/accuracy_stats.py, benchmarks/accuracy.py):
the paired t-test against a hand computation, the convergence judgement, the table, the Pareto input that
benchmarks/pareto.py reads, and a second call with other rows adding to the same results file."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from benchmarks.accuracy_stats import convergence, headline, markdown, paired, pareto_input  # noqa: E402


def run(row, seed, top1, method=None, encoder=None, curve=None):
    history = [{"epoch": i + 1, "top1": {"plain": v}} for i, v in enumerate(curve or [])]
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
    assert "+3.00 ± 0.00, p = 0.000" in table  # FM-KT minus KD: 3 on both seeds
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
