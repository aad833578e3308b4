"""The epoch loop's numbers and its fast path, on the CPU: the LR each record states is the one its steps trained
with, the losses are read from the device a few times an epoch (not per step), images/s counts the images trained
in the time it divides by, and the engine's captured step (on tests/graph_emulator.py's graph) trains as the
eager one does, from a fresh start, from a CPU checkpoint, and on an image folder read by workers."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fmkt.capture as capture
import fmkt.engine as engine
import fmkt.meter as meter
from fmkt.capture import WARMUP, FastPath
from fmkt.config import Config
from fmkt.errors import FmktError
from fmkt.logs import NoLogger
from fmkt.optim import build_optimizer
from graph_emulator import HostGraphs

BASE_LR = 0.05
TIMES = ("epoch_seconds", "images_per_s")


def tiny_config(out, *, epochs=2, train=96, batch=32, **sets) -> Config:
    """Method none on digits: 3 steps an epoch, x0.1 from epoch 2 (multistep milestone 1)."""
    cfg = Config()
    cfg.out, cfg.method.name, cfg.data.name = str(out), "none", "digits"
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = train, 48, batch
    cfg.train.epochs, cfg.optim.lr, cfg.optim.scheduler, cfg.optim.milestones = epochs, BASE_LR, "multistep", [1]
    cfg.optim.warmup_epochs = 0.0
    for key, value in sets.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class StepLog(NoLogger):
    """train.log's per-step calls, recorded."""

    def __init__(self):
        self.steps = []

    def step(self, step, losses, lr, images_per_s):
        self.steps.append((step, dict(losses), float(lr)))


@pytest.fixture
def step_log(monkeypatch):
    log = StepLog()
    monkeypatch.setattr(engine, "open_logger", lambda *a, **k: log)
    return log


class Graphs(HostGraphs):
    made: list = []

    def __init__(self):
        super().__init__()
        Graphs.made.append(self)


@pytest.fixture
def emulated_capture(monkeypatch):
    """The engine's captured step on the CPU: a plan that captures, and the emulated graph for CUDA's."""
    Graphs.made = []
    monkeypatch.setattr(engine, "fast_path_plan", lambda *a, **k: FastPath(False, True, "test: captured"))
    monkeypatch.setattr(capture, "CudaGraphs", Graphs)
    return Graphs.made


# ------------------------------------------------------------------------------------------- the LR
def test_epoch_record_states_the_lr_its_steps_trained_with(tmp_path, step_log):
    """At a milestone, epoch 1's record says the LR epoch 1 trained at (it said the decayed one, read after the
    scheduler had stepped), and each step's log says its own LR."""
    engine.fit(tiny_config(tmp_path / "r"))
    assert [r["lr"] for r in records(tmp_path / "r")] == pytest.approx([BASE_LR, BASE_LR * 0.1])
    assert [s[0] for s in step_log.steps] == [1, 2, 3, 4, 5, 6]
    assert [s[2] for s in step_log.steps] == pytest.approx([BASE_LR] * 3 + [BASE_LR * 0.1] * 3)


def test_the_logged_lr_is_the_one_the_weights_moved_by(tmp_path, monkeypatch, step_log):
    """Plain SGD (no momentum or weight decay): each step moves the weights by lr x gradient; the LR read back from
    that update equals the LR the step's log states, on both sides of the milestone."""
    applied = []
    real_step = capture.EagerStep.__call__

    def measuring(self, images, labels, progress=0.0):
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        losses = real_step(self, images, labels, progress)
        num = sum(float(((b - p.detach()) * p.grad).sum()) for b, p in zip(before, params))
        applied.append(num / sum(float((p.grad * p.grad).sum()) for p in params))
        return losses

    monkeypatch.setattr(capture.EagerStep, "__call__", measuring)
    engine.fit(tiny_config(tmp_path / "r", optim__momentum=0.0, optim__weight_decay=0.0))
    assert applied == pytest.approx([s[2] for s in step_log.steps], rel=1e-5)


# ------------------------------------------------------------------------------------------- host reads
class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (each one waits for the device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_captured_loop_reads_the_device_a_fixed_number_of_times(tmp_path, monkeypatch, emulated_capture):
    """With the step captured, an epoch's host reads do not grow with its steps: the losses are read when the
    progress bar refreshes and at the epoch's end (here never in between), not per step."""
    monkeypatch.setattr(meter, "REFRESH_S", 1e9)
    real_read, reads_of_losses = meter.EpochMeter.read, []

    def read(self):
        got = real_read(self)
        reads_of_losses.append(len(got)) if got else None
        return got

    monkeypatch.setattr(meter.EpochMeter, "read", read)
    counts = {}
    for steps in (4, 8):
        with HostReads() as reads:
            engine.fit(tiny_config(tmp_path / f"r{steps}", epochs=1, train=16 * steps, batch=16))
        counts[steps] = reads.count
    assert emulated_capture[-1].captures == 1
    assert counts[4] == counts[8], counts  # no read of a tensor per step (a float() of each loss was one)
    assert reads_of_losses == [4, 8]  # each epoch's losses read back once, at its end (.tolist(): one copy)


def test_the_meter_reads_pending_steps_at_its_refresh(monkeypatch):
    now = [0.0]
    m = meter.EpochMeter(clock=lambda: now[0])
    for step in range(3):
        m.add(step, {"loss_ce": torch.tensor(1.0 + step), "loss_kd": torch.tensor(0.5)}, 4, 0.1)
        assert not m.due()
    now[0] = meter.REFRESH_S
    assert m.due()
    got = m.read()
    assert [r.step for r in got] == [0, 1, 2] and got[2].losses == {"loss_ce": 3.0, "loss_kd": 0.5}
    assert m.sums == {"loss_ce": 4 * (1.0 + 2.0 + 3.0), "loss_kd": 4 * 1.5} and m.seen == m.trained == 12
    m.add(3, {"loss_ce": torch.tensor(float("nan")), "loss_kd": torch.tensor(0.5)}, 4, 0.1)
    with pytest.raises(meter.NonFiniteStep) as exc:
        m.read()
    assert exc.value.step == 3 and m.seen == 12


# ------------------------------------------------------------------------------------------- images/s
def test_a_resumed_epoch_divides_the_images_it_trained_by_its_time(tmp_path, monkeypatch):
    """An epoch resumed from a mid-epoch checkpoint holds the sums of the steps before it, but its seconds are the
    resumed process's: images/s counts only the images trained in them (it counted the whole epoch's)."""
    real = engine.save_run

    class Killed(Exception):
        pass

    def killed_after_the_first_mid_epoch_checkpoint(run, epoch, step_in_epoch, *rest):
        real(run, epoch, step_in_epoch, *rest)
        if step_in_epoch:
            raise Killed

    cfg = tiny_config(tmp_path / "r", epochs=1, train=192, batch=16, train__checkpoint_every_steps=4)
    monkeypatch.setattr(engine, "save_run", killed_after_the_first_mid_epoch_checkpoint)
    with pytest.raises(Killed):
        engine.fit(cfg)
    monkeypatch.setattr(engine, "save_run", real)
    engine.fit(cfg, resume=True)
    (rec,) = records(tmp_path / "r")
    trained = 192 - 4 * 16
    assert rec["images_per_s"] * rec["epoch_seconds"] == pytest.approx(trained, rel=0.02)


# ------------------------------------------------------------------------------------------- the engine, captured
def test_the_engines_captured_step_trains_as_the_eager_one(tmp_path, monkeypatch):
    """fit with the captured step (emulated graph) against fit with the eager step (the same fused optimiser), KD
    with a teacher: one graph, and the same records (losses, LR, top-1) to the bit."""
    teacher_cfg = tiny_config(tmp_path / "t", epochs=1)
    teacher = engine.fit(teacher_cfg)
    from fmkt.artifact import load_artifact

    model, _ = load_artifact(teacher.artifact)
    results = {}
    for path in ("eager", "captured"):
        with monkeypatch.context() as m:
            if path == "captured":
                Graphs.made = []
                m.setattr(engine, "fast_path_plan", lambda *a, **k: FastPath(False, True, "test: captured"))
                m.setattr(capture, "CudaGraphs", Graphs)
            else:  # the same fused optimiser with its LR tensor, stepped eagerly
                m.setattr(engine, "build_optimizer", lambda cfg, params, **k: build_optimizer(cfg, params,
                                                                                                device_lr=True))
            cfg = tiny_config(tmp_path / path, method__name="kd", method__dkd_warmup_epochs=0.0)
            results[path] = engine.fit(cfg, teacher=model.eval())
    (graphs,) = Graphs.made
    assert graphs.captures == 1
    eager, captured = (records(tmp_path / p) for p in ("eager", "captured"))
    assert len(eager) == len(captured) == 2
    for a, b in zip(eager, captured):
        assert {k: v for k, v in a.items() if k not in TIMES} == {k: v for k, v in b.items() if k not in TIMES}


def test_a_captured_run_resumes_from_a_cpu_checkpoint(tmp_path, monkeypatch, emulated_capture):
    """Epoch 1 trained by the eager CPU path (float LR) and checkpointed; the run then dies and resumes with the
    captured step (train.fast_path may change on resume). The graph is recorded with the LR as a tensor, so epoch 2
    trains at the decayed LR: read back from the weights by the LR test above, stated here by the records."""
    real = engine.save_run

    class Killed(Exception):
        pass

    def killed_after_epoch_one(run, epoch, step_in_epoch, *rest):
        real(run, epoch, step_in_epoch, *rest)
        raise Killed

    cfg = tiny_config(tmp_path / "r", epochs=2, train=192, batch=16)
    with monkeypatch.context() as m:
        m.setattr(engine, "fast_path_plan", lambda *a, **k: FastPath(False, False, "eager"))
        m.setattr(engine, "save_run", killed_after_epoch_one)
        with pytest.raises(Killed):
            engine.fit(cfg)
    lr = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, float)  # what the CPU run wrote
    engine.fit(cfg, resume=True)
    (graphs,) = emulated_capture
    assert graphs.captures == 1
    assert [r["lr"] for r in records(tmp_path / "r")] == pytest.approx([BASE_LR, BASE_LR * 0.1])


def test_a_nonfinite_loss_in_the_captured_loop_stops_at_its_step(tmp_path, monkeypatch, emulated_capture):
    """The captured step does not raise itself (that would read the device every step): the loop raises when it
    reads the losses, naming the first step whose loss was not finite (a step after the eager warm-up)."""
    import fmkt.distillers.baselines as baselines

    real = baselines.VanillaDistiller.forward_train
    calls = []

    def poisoned(self, images, labels, progress=0.0):
        calls.append(1)
        logits, losses = real(self, images, labels, progress)
        if len(calls) > WARMUP:  # from the capture on (recorded into the graph): NaN for a batch holding a 0
            losses["loss_ce"] = losses["loss_ce"] + torch.where((labels == 0).any(), float("nan"), 0.0)
        return logits, losses

    monkeypatch.setattr(baselines.VanillaDistiller, "forward_train", poisoned)
    with pytest.raises(FmktError, match=r"the loss became nan at epoch 1, step \d+") as exc:
        engine.fit(tiny_config(tmp_path / "r", epochs=1, train=192, batch=16))
    assert emulated_capture[-1].captures == 1
    assert int(str(exc.value).split("step ")[1].split(";")[0]) > WARMUP and "try a lower --lr" in str(exc.value)


def test_a_captured_run_on_an_image_folder_with_workers(tmp_path, monkeypatch, emulated_capture):
    """The folder loader's worker processes and the captured step together (on CUDA, scripts/gpu_check.sh runs
    this with the pin-memory thread beside a real capture)."""
    from imagefolder_data import make_image_folder

    root = make_image_folder(tmp_path / "folder", classes=3, train_per_class=12, val_per_class=4)
    cfg = tiny_config(tmp_path / "r", epochs=1, train=None, batch=8)
    cfg.data.name, cfg.data.dir, cfg.data.workers, cfg.data.test_subset = "imagefolder", str(root), 2, None
    engine.fit(cfg)
    (rec,) = records(tmp_path / "r")
    assert emulated_capture[-1].captures == 1 and torch.isfinite(torch.tensor(rec["train_loss"]))
