"""The Python API for your own models (fmkt.FMKT, fmkt.wrap_student, fmkt.export_artifact) and the example."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fmkt
from fmkt.errors import FmktError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import custom_nets  # noqa: E402


def _loaders(n=128, classes=10):
    train, test, _ = fmkt.load_dataset("digits")
    keep = train.labels < classes
    x, y = train.images[keep][:n], train.labels[keep][:n]
    return DataLoader(TensorDataset(x, y), 32, shuffle=True), DataLoader(TensorDataset(test.images[:64],
                                                                                        test.labels[:64]), 64)


class LogitsOnlyTeacher(nn.Module):
    """A teacher with no pool + linear head at all: only its logits are used."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))


def test_example_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setattr(sys, "argv", ["custom_models.py", str(tmp_path)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is as fast, and immune to a busy shared runner
    try:
        runpy.run_path(str(ROOT / "examples" / "custom_models.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "parity passed" in printed
    meta = json.loads((tmp_path / "artifact" / "fmkt.json").read_text())
    assert meta["model"]["arch"] == "custom_models:StudentCNN"
    assert meta["model"]["adapter"] == {"feature_layer": None, "classifier": "fc"}  # its forward_features
    assert set(meta["metrics"]["last"]) == {"1", "2", "4"} and meta["metrics"]["last"]["4"] > 80
    parity = json.loads((tmp_path / "export-onnx-k4" / "parity.json").read_text())
    assert parity["passed"] and "digits test split" in parity["reports"][0]["data"]
    model, _ = fmkt.load_artifact(tmp_path / "artifact")  # rebuilt from the recorded import path
    assert model.is_flow and model.num_classes == 10


def test_wrap_student_finds_the_map_and_the_head():
    x = torch.rand(4, 1, 8, 8)
    found = fmkt.wrap_student(custom_nets.small_cnn(), x)
    assert found.options == {"feature_layer": "body", "classifier": "fc"}  # the map before the pool
    assert (found.num_features, found.num_classes) == (16, 10)
    assert found.forward_features(x).shape == (4, 16, 8, 8)
    named = fmkt.wrap_student(custom_nets.small_cnn(), x, feature_layer="body.5", classifier="fc")
    assert named.options["feature_layer"] == "body.5"


@pytest.mark.parametrize("kwargs, match", [
    ({}, "not global average pooling"),
    ({"feature_layer": "nope"}, "no submodule 'nope'"),
    ({"classifier": "body.0"}, "not an nn.Linear"),
])
def test_wrap_student_refuses_what_fmkt_cannot_use(kwargs, match):
    with pytest.raises(FmktError, match=match):
        fmkt.wrap_student(custom_nets.mlp_head_cnn(), torch.rand(2, 1, 8, 8), **kwargs)


def test_own_loop_trains_only_the_student_side_and_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    train, test = _loaders()
    teacher = custom_nets.teacher_cnn(10, 1)
    fm = fmkt.FMKT(custom_nets.small_cnn(), teacher, train, train_steps="1,2", arch="custom_nets:small_cnn")
    trainable = {id(p) for p in fm.parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in fm.model.encoder.parameters()} <= trainable
    opt = torch.optim.SGD(fm.parameters(), lr=0.05, momentum=0.9)
    fm.train()
    for images, labels in train:
        loss = fm.loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not teacher.training and torch.isfinite(loss) and set(fm.last_losses) == {"loss_ce", "loss_kd"}
    acc = fm.evaluate(test, steps=[1, 2])
    assert set(acc) == {1, 2}
    artifact = fm.save(tmp_path / "artifact")
    result = fmkt.export_artifact(artifact, steps=2)  # through the forward hook on "body"
    assert result.passed and (result.out / "model.onnx").is_file()
    model, meta = fmkt.load_artifact(artifact)
    assert meta["model"]["adapter"]["feature_layer"] == "body" and meta["teacher"]["sha256"]
    x = next(iter(test))[0]
    torch.testing.assert_close(model(x, steps=2), fm.predict(x, steps=2))


def test_fit_with_a_logits_only_teacher_and_normalisation():
    torch.manual_seed(0)
    train, test = _loaders()
    fm = fmkt.FMKT(custom_nets.small_cnn(), LogitsOnlyTeacher(), next(iter(train)), train_steps=2,
                   mean=[0.3], std=[0.4], encoder="mlp", schedule="vp")
    history = fm.fit(train, epochs=1, lr=0.05, test_loader=test, eval_steps=[1, 2], log=None)
    assert len(history) == 1 and set(history[0]["top1"]) == {1, 2}
    assert fm.model.normalize.mean.flatten().tolist() == pytest.approx([0.3])


def test_feature_transfer_and_teacher_free_methods():
    torch.manual_seed(0)
    train, _ = _loaders(64)
    images, labels = next(iter(train))
    fm = fmkt.FMKT(custom_nets.small_cnn(), custom_nets.teacher_cnn(10, 1), images, transfer="features",
                   teacher_feature_layer="body", train_steps=2)
    assert set(fm.distiller.forward_train(images, labels)[1]) == {"loss_ce", "loss_flow"}
    assert torch.isfinite(fm.loss(images, labels))
    online = fmkt.FMKT(custom_nets.small_cnn(), None, images, method="ofmkt", train_steps=2)
    assert torch.isfinite(online.loss(images, labels))
    with pytest.raises(FmktError, match="needs a teacher"):
        fmkt.FMKT(custom_nets.small_cnn(), None, images)
    with pytest.raises(FmktError, match="unknown config key 'method.nope'"):
        fmkt.FMKT(custom_nets.small_cnn(), None, images, method="ofmkt", nope=1)
    with pytest.raises(FmktError, match="teacher gives 10 logits but the student 7"):
        fmkt.FMKT(custom_nets.small_cnn(num_classes=7), custom_nets.teacher_cnn(10, 1), images)


def test_the_api_imports_neither_the_engine_nor_the_cli_root():
    """fmkt.api sits on fmkt.step and fmkt.loop: importing it loads neither the engine (rich, checkpoints, logs)
    nor fmkt.commands (the CLI's composition root)."""
    import subprocess

    code = ("import sys, fmkt.api; print(sorted(m for m in ('fmkt.engine', 'fmkt.commands', 'fmkt.checkpoint', "
            "'fmkt.logs', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_fit_runs_the_engines_epoch_loop(monkeypatch):
    """FMKT.fit is fmkt.loop.run_epoch (the engine's loop) around fmkt.capture.make_step's step: the same records
    and weights as a plain loop of fmkt.step.train_step summing each step's losses, the last step's losses kept,
    fast_path=auto off CUDA the same eager step, and the engine's sentence for a NaN loss."""
    import fmkt.api as api
    from fmkt.config import Config
    from fmkt.meter import epoch_record
    from fmkt.optim import build_optimizer, build_scheduler, epoch_lr
    from fmkt.step import train_step

    train, _ = _loaders(96)
    loader = DataLoader(train.dataset, 32)  # unshuffled: both runs see the same batches

    def build():
        torch.manual_seed(0)
        return fmkt.FMKT(custom_nets.small_cnn(), custom_nets.teacher_cnn(10, 1), next(iter(loader)), train_steps=2)

    epochs_run = []
    real = api.run_epoch
    monkeypatch.setattr(api, "run_epoch", lambda *a, **k: epochs_run.append(a[2]) or real(*a, **k))
    fm, ref = build(), build()
    history = fm.fit(loader, epochs=2, log=None, fast_path="auto")
    assert epochs_run == [0, 1]
    cfg = Config()
    cfg.train.epochs = 2
    opt = build_optimizer(cfg, ref.parameters())
    sched, iters, expected = build_scheduler(cfg, opt, len(loader)), len(loader), []
    for epoch in range(2):
        ref.train()
        sums, seen = {}, 0
        for step, (x, y) in enumerate(loader):
            losses = train_step(ref.distiller, opt, sched, x, y, epoch + step / iters)
            last = {k: float(v.detach()) for k, v in losses.items()}
            sums = {k: sums.get(k, 0.0) + v * len(y) for k, v in last.items()}
            seen += len(y)
        expected.append(epoch_record(epoch, epoch_lr(cfg, epoch, iters), sums, seen, 1.0))
    times = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in times} for r in history] == \
        [{k: v for k, v in r.items() if k not in times} for r in expected]
    assert fm.last_losses == last
    for a, b in zip(fm.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    monkeypatch.setattr(fm.distiller, "forward_train",
                        lambda images, labels, progress=0.0: (None, {"loss_kd": images.sum() * float("nan")}))
    with pytest.raises(FmktError, match="before any weight update"):
        fm.fit(loader, epochs=1, log=None)
    with pytest.raises(FmktError, match="unknown fast_path 'fast'"):
        fm.fit(loader, epochs=1, log=None, fast_path="fast")
