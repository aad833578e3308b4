"""The accuracy benchmark's ViT protocols (benchmarks/accuracy.py, issue 21): a DeiT student beside the CPU
protocol's wrn_16_2 teacher, a DeiT teacher of resnet8 students; each model trained with its own optimiser (AdamW
for a DeiT, the recipe's SGD otherwise), the models' keyword arguments in the config and in the table's label, and
the older protocols' configs and results keys exactly as before."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from fmkt.commands import check_config, teacher_cache_key, teacher_config  # noqa: E402
from fmkt.config import build_config  # noqa: E402


def configs(name, *extra):
    p = accuracy.PROTOCOLS[name]
    args = accuracy.parse_args(["--protocol", name, *extra])
    return p, args, accuracy.base_config(p, args, 1, "out"), accuracy.base_config(p, args, 0, "t", teacher=True)


def test_vit_protocols_run_the_core_rows_on_three_seeds():
    for name in ("vit-student", "vit-teacher"):
        p = accuracy.PROTOCOLS[name]
        assert p.rows == ("none", "kd", "dkd", "dist", "fmkt") and p.seeds == (0, 1, 2)
        assert p.train_subset and "not converged" in p.description


def test_vit_student_trains_with_adamw_beside_the_cpu_protocols_teacher():
    p, _, student, teacher = configs("vit-student")
    assert student.student == accuracy.DEIT and student.student_kwargs == p.student_kwargs
    assert student.student_kwargs["img_size"] == 28 and student.student_kwargs["patch_size"] == 7
    assert student.optim.name == "adamw" and student.optim.lr == p.optim["lr"] and student.optim.weight_decay == 0.05
    t = teacher_config(teacher)  # the wrn_16_2 teacher keeps the recipe's SGD
    assert t.student == "wrn_16_2" and t.optim.name == "sgd" and t.optim.lr == 0.05 and t.student_kwargs == {}
    cpu = accuracy.PROTOCOLS["cpu"]
    same = accuracy.base_config(cpu, accuracy.parse_args(["--train-subset", str(p.train_subset)]), 0, "t")
    assert teacher_cache_key(t) == teacher_cache_key(teacher_config(same))  # the CPU protocol's on the same data
    assert accuracy.protocol_record(p, accuracy.parse_args([]))["student"].startswith(accuracy.DEIT + " (img_size=28")


def test_vit_teacher_is_a_deit_trained_with_adamw_for_resnet8_students():
    p, args, student, teacher = configs("vit-teacher", "--threads", "1")
    assert student.student == "resnet8" and student.optim.name == "sgd" and student.train.threads == 1
    assert student.teacher.arch == accuracy.DEIT and student.teacher.kwargs == p.teacher_kwargs
    t = teacher_config(teacher)
    assert t.student == accuracy.DEIT and t.student_kwargs == p.teacher_kwargs
    assert t.optim.name == "adamw" and t.optim.lr == p.teacher_lr and t.train.epochs == p.teacher_epochs
    rec = accuracy.protocol_record(p, args)
    assert rec["teacher_arch"] == accuracy.DEIT and rec["teacher_optim"]["name"] == "adamw"
    assert rec["student"] == "resnet8"
    check_config(student)  # builds and dry-runs the timm teacher at 28 x 28


def test_vit_student_config_passes_the_checks():
    check_config(configs("vit-student")[2])  # the DeiT at img_size 28, patch_size 7 takes a dry-run batch


def test_older_protocols_keep_their_configs_and_records():
    """The configs the older protocols built before the ViT protocols (the recipe, then these keys) and the
    results file's protocol section with exactly its former keys."""
    for name in ("converged", "cpu", "recipe", "core"):
        p = accuracy.PROTOCOLS[name]
        args = accuracy.parse_args(["--protocol", name])
        before = {"data": {"train_subset": p.train_subset}, "train": {"seed": 2, "epochs": p.epochs, "eval_every": 1},
                  "teacher": {"epochs": p.teacher_epochs}, "student": p.student, "out": "o",
                  "method": {"eval_steps": [1, 2, 4, 8], "name": "kd"}}
        want = build_config("fashion-mnist", [before]).to_dict()
        for teacher in (False, True):
            assert accuracy.base_config(p, args, 2, "o", {"name": "kd"}, teacher=teacher).to_dict() == want
        assert accuracy.protocol_record(p, args) == {
            "name": p.name, "description": p.description, "student": p.student, "epochs": p.epochs,
            "teacher_epochs": p.teacher_epochs, "train_subset": p.train_subset}


def test_teacher_curve_keeps_the_evaluated_epochs(tmp_path, monkeypatch):
    """A teacher evaluated every other epoch (eval_every 2) has epochs without top-1 in metrics.jsonl: the curve
    lists the evaluated ones (the table formats each; a None there broke the first vit-student table)."""
    import json

    import fmkt.commands as commands

    (tmp_path / "artifact").mkdir()
    lines = [{"epoch": e, **({"top1": {"plain": 60.0 + e}} if e % 2 == 0 else {})} for e in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    tinfo = {"arch": "wrn_16_2", "source": str(tmp_path / "artifact"), "sha256": "x", "accuracy": None}
    monkeypatch.setattr(commands, "obtain_teacher", lambda cfg, console: (None, dict(tinfo)))
    monkeypatch.setattr(commands, "teacher_accuracy", lambda teacher, cfg: 64.0)
    p = accuracy.PROTOCOLS["vit-student"]
    rec = accuracy.teacher_record(p, accuracy.parse_args(["--protocol", "vit-student"]), None)
    assert rec["curve"] == [62.0, 64.0] and rec["accuracy"] == 64.0
