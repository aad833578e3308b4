"""The walk of one `fmkt-cli distill` through the code: the config is checked once, the device resolved once, the
dataset's facts found once and its splits loaded once, whether the default teacher is trained first or reused."""
from collections import Counter

import pytest
from typer.testing import CliRunner

import fmkt.commands as commands
import fmkt.data as data
import fmkt.engine as engine
import fmkt.runtime as runtime
from fmkt.cli.app import app

TINY = ["--set", "data.train_subset=96", "--set", "data.test_subset=48", "--batch-size", "32",
        "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1", "--set", "method.train_steps=2"]


@pytest.fixture
def calls(monkeypatch):
    """How often the walk's four steps run, wherever their modules imported them."""
    counts = Counter()
    steps = {"check_config": commands.check_config, "resolve_device": runtime.resolve_device,
             "dataset_info": data.dataset_info, "load_dataset": data.load_dataset}
    for name, fn in steps.items():
        def counted(*a, _name=name, _fn=fn, **k):
            counts[_name] += 1
            return _fn(*a, **k)

        for module in (commands, engine, runtime, data):
            if getattr(module, name, None) is fn:
                monkeypatch.setattr(module, name, counted)
    return counts


def test_distill_checks_resolves_and_loads_once(tmp_path, calls, monkeypatch):
    monkeypatch.setenv("FMKT_CACHE", str(tmp_path / "cache"))  # its own cache: the first run trains the teacher
    for run in ("teacher trained", "teacher reused"):
        calls.clear()
        result = CliRunner().invoke(app, ["distill", "--epochs", "1", "--out", str(tmp_path / run), *TINY])
        assert result.exit_code == 0, result.output
        assert ("training resnet8" if run == "teacher trained" else "reusing resnet8") in result.output
        assert dict(calls) == {"check_config": 1, "resolve_device": 1, "dataset_info": 1, "load_dataset": 1}, run


def test_train_checks_resolves_and_loads_once(tmp_path, calls):
    result = CliRunner().invoke(app, ["train", "--model", "resnet8", "--epochs", "1", "--out", str(tmp_path / "t"),
                                      "--set", "data.train_subset=96", "--set", "data.test_subset=48"])
    assert result.exit_code == 0, result.output
    assert dict(calls) == {"check_config": 1, "resolve_device": 1, "dataset_info": 1, "load_dataset": 1}


def test_a_changed_config_is_checked_again(calls):
    from fmkt.config import build_config

    cfg = commands.check_config(build_config())
    assert commands.checked_info(cfg).name == "digits" and calls["check_config"] == 1
    cfg.method.name = "nope"  # changed after its check: run_distill checks it again, and refuses it
    with pytest.raises(commands.FmktError, match="unknown method 'nope'"):
        commands.run_distill(cfg)
    assert calls["check_config"] == 2
