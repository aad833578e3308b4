"""The GPU fast path: which runs may capture the step (and why not, as data per method), the optimiser a graph
needs and keeps across a resume, and the captured step against the eager one.

The captured-step tests run twice where they can: on the CPU with tests/graph_emulator.py standing in for the
CUDA graph (it freezes what a capture freezes: every Python number read at capture time), and on CUDA with the
real graph (scripts/gpu_check.sh runs them there). Each asserts that a graph was recorded and replayed: a capture
that failed and quietly trained eagerly fails them.
"""
import io
from types import SimpleNamespace

import pytest
import torch

from fmkt import capture as capture_module
from fmkt.capture import (CAPTURE_ERROR_MODE, WARMUP, CapturedStep, CudaGraphs, EagerStep, capture_refusal,
                          fast_path_plan, make_step)
from fmkt.checkpoint import restore, training_state
from fmkt.config import Config
from fmkt.distillers import METHODS, Distiller, Method, build_distiller
from fmkt.distillers.base import warmup_ends, warmup_factor
from fmkt.optim import build_optimizer, build_scheduler, graph_refusal, load_optimizer_state, scheduled_lr
from fmkt.student import StudentSpec, build_student
from graph_emulator import CaptureError, HostGraphs

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
# where the captured step runs: the emulated graph on the CPU always, the real one where CUDA is
DEVICES = [pytest.param(CPU, id="cpu-emulated"),
           pytest.param(CUDA, id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA (gpu_check.sh)"))]
ITERS = 7  # steps per "epoch" in the step tests: WARMUP eager, the capture, then replays
MILESTONE = 0.7  # x0.1 from step 5 of 7 on: after the capture, so only the graph's LR tensor can apply it
RESUME_AT = 1  # a resumed run's first step (the capture then records step 4, before the milestone)


def config(**method):
    cfg = Config()
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


# ------------------------------------------------------------------------------------------- who may capture
@pytest.mark.parametrize("method,world,device,why", [
    ({}, 1, CUDA, None),
    ({"name": "kd"}, 1, CUDA, None),
    ({}, 1, CPU, "needs CUDA"),
    ({}, 2, CUDA, "DDP"),
    ({"train_steps": "1,2,4,8,16"}, 1, CUDA, "draws N per iteration"),
    ({"dirac_ratio": 0.5}, 1, CUDA, "Dirac ratio"),
    ({"name": "ofmkt", "train_steps": "2,4"}, 1, CUDA, "draws N per iteration"),
    ({"name": "ofmkt", "dirac_ratio": 0.5}, 1, CUDA, None),  # no teacher, so the Dirac ratio is never drawn
    ({"name": "dkd"}, 1, CUDA, None),  # DKD's warm-up delays the capture (steady_from), it does not refuse it
    ({"loss": "dkd", "dkd_warmup_epochs": 0}, 1, CUDA, None),
])
def test_capture_steps_aside_where_a_step_is_not_the_same_computation(method, world, device, why):
    cfg = config(**method)
    got = capture_refusal(cfg, device, world, METHODS[cfg.method.name])
    assert (got is None) if why is None else (why in got), got


def test_every_method_states_its_capture_refusal_as_data():
    """Each registered method answers for itself (capture.py names none); a new distiller that says nothing is
    refused, never captured wrongly by accident."""
    expected = {  # (default config, train_steps drawn, Dirac ratio 0.5) -> refused?
        "none": (False, False, False), "kd": (False, False, False), "dkd": (False, False, False),
        "dist": (False, False, False), "fmkt": (False, True, True), "theta": (False, True, True),
        "ofmkt": (False, True, False)}
    assert set(expected) == set(METHODS), "a method was registered: say here whether its step can be captured"
    for name, method in METHODS.items():
        got = tuple(method.capture_refusal(config(name=name, **extra).method) is not None
                    for extra in ({}, {"train_steps": "2,4"}, {"dirac_ratio": 0.5}))
        assert got == expected[name], (name, got)

    class Silent(Distiller):
        pass

    reason = Method(Silent, False, False, False, "a new method").capture_refusal(Config().method)
    assert reason is not None and "Silent" in reason


def test_fast_path_plan_says_what_it_does():
    cfg = config()
    plan = fast_path_plan("auto", cfg, CPU, 1, METHODS["fmkt"])
    assert (plan.on_gpu, plan.capture) == (False, False)
    assert fast_path_plan("off", cfg, CUDA, 1, METHODS["fmkt"]).line == "fast path: off (--set train.fast_path=off)"
    plan = fast_path_plan("on", config(dirac_ratio=0.5), CUDA, 1, METHODS["fmkt"])
    assert plan.on_gpu and not plan.capture and "Dirac ratio" in plan.line
    plan = fast_path_plan("auto", config(name="dkd", dkd_warmup_epochs=20), CUDA, 1, METHODS["dkd"])
    assert plan.capture and plan.steady_from == 19 and "from epoch 20" in plan.line


# ------------------------------------------------------------------------------------------- DKD's warm-up
def test_dkd_warmup_counts_epochs_from_one_as_mdistiller():
    """mdistiller: min(epoch / WARMUP, 1) with epoch = 1, 2, ... held for the whole epoch (trainer.py, DKD.py)."""
    cfg = config(dkd_warmup_epochs=20).method
    assert [warmup_factor(cfg, p) for p in (0.0, 0.99, 1.0, 18.5, 19.0, 25.0)] == [1 / 20, 1 / 20, 2 / 20, 19 / 20,
                                                                                   1.0, 1.0]
    assert warmup_factor(config(dkd_warmup_epochs=1).method, 0.0) == 1.0  # ImageNet's WARMUP 1: no ramp at all
    assert warmup_factor(config(dkd_warmup_epochs=0).method, 0.0) == 1.0
    assert warmup_ends(cfg, "dkd") == 19 and warmup_ends(cfg, "kd") == 0  # only DKD reads the factor
    assert warmup_ends(config(dkd_warmup_epochs=1.5).method, "dkd") == 1
    assert METHODS["dkd"].steady_from(cfg) == 19 and METHODS["kd"].steady_from(cfg) == 0
    assert METHODS["fmkt"].steady_from(config(loss="dkd", dkd_warmup_epochs=20).method) == 19


def test_imagenet_dkd_recipes_use_no_warmup():
    from fmkt.distillers.published import PUBLISHED_IMAGENET

    assert PUBLISHED_IMAGENET["dkd"].method["dkd_warmup_epochs"] == 0.0
    assert "counts epochs from 1" in PUBLISHED_IMAGENET["dkd"].note


# ------------------------------------------------------------------------------------------- the optimiser
def _params(device=CPU):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, device=device)), torch.nn.Parameter(torch.randn(3, device=device))]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_float_lr_checkpoint_restores_into_a_device_lr_tensor(name):
    """A checkpoint from a CPU run (or from before the LR became a tensor) holds a Python-float LR and fused=None:
    the resumed optimiser keeps its own LR tensor (on the model's device, with the checkpoint's value), its fused
    and capturable flags, and AdamW's step counters where its fused step reads them."""
    cfg = Config()
    cfg.optim.name = name
    old_params = _params()
    old = build_optimizer(cfg, old_params, device_lr=False)
    for p in old_params:
        p.grad = torch.ones_like(p)
    old.step()
    old.param_groups[0]["lr"] = 0.0123
    buffer = io.BytesIO()
    torch.save(old.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert isinstance(state["param_groups"][0]["lr"], float)

    device = CUDA if HAS_CUDA else CPU
    new = build_optimizer(cfg, _params(device), device_lr=True, capturable=True)
    lr_tensor = new.param_groups[0]["lr"]
    load_optimizer_state(new, state)
    group = new.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].device.type == device.type
    assert group["lr"] is lr_tensor and float(group["lr"]) == pytest.approx(0.0123)
    assert group["fused"] is True and group.get("capturable", True) is True
    for p in group["params"]:
        if "step" in new.state[p]:
            assert new.state[p]["step"].device.type == device.type and new.state[p]["step"].dtype == torch.float32
    assert graph_refusal(new) is None


def test_graph_refusal_says_why_as_data():
    cfg = Config()
    assert "Python number 0.05" in graph_refusal(build_optimizer(cfg, _params(), device_lr=False))
    fused = build_optimizer(cfg, _params(), device_lr=True)
    assert graph_refusal(fused) is None
    cfg.optim.name = "adamw"
    assert "capturable=False" in graph_refusal(build_optimizer(cfg, _params(), device_lr=True, capturable=False))
    assert graph_refusal(build_optimizer(cfg, _params(), device_lr=True, capturable=True)) is None
    unfused = torch.optim.SGD(_params(), lr=torch.tensor(0.1))
    assert "not the fused" in graph_refusal(unfused)


def test_the_capture_runs_in_thread_local_mode(monkeypatch):
    """The folder loader's pin-memory thread calls CUDA during a capture: the default "global" mode would
    invalidate the capture and poison that thread (pytorch/pytorch#174724)."""
    seen = {}

    class FakeGraph:
        pass

    class FakeContext:
        def __init__(self, graph, **kwargs):
            seen.update(kwargs, graph=graph)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeContext)
    ran = []
    graph = CudaGraphs().capture(lambda: ran.append(1))
    assert isinstance(graph, FakeGraph) and ran == [1]
    assert seen["capture_error_mode"] == CAPTURE_ERROR_MODE == "thread_local"


# ------------------------------------------------------------------------------------------- the captured step
def _distiller(method: str, device, optim: str = "sgd", **optim_options):
    """A tiny distiller of ``method`` (8 x 8 images) and its run's optimiser and scheduler, as fmkt builds them for
    a capture: device-tensor LR, fused, capturable; multistep x0.1 at MILESTONE of a 1-epoch, ITERS-step run."""
    torch.manual_seed(0)
    m = METHODS[method]
    common = dict(num_classes=10, channels=1, size=(8, 8), mean=(0.5,), std=(0.5,))
    teacher = build_student(StudentSpec(arch="resnet8", **common)).eval() if m.needs_teacher else None
    student = build_student(StudentSpec(arch="resnet8", encoder="conv" if m.flow else None, default_steps=2,
                                        theta_head=m.theta, **common))
    cfg = config(name=method, train_steps="2", dkd_warmup_epochs=0)
    cfg.optim.name, cfg.optim.scheduler, cfg.optim.milestones, cfg.train.epochs = optim, "multistep", [MILESTONE], 1
    for k, v in optim_options.items():
        setattr(cfg.optim, k, v)
    d = build_distiller(cfg.method, student, teacher, input_shape=(1, 8, 8)).to(device).train()
    opt = build_optimizer(cfg, d.parameters(), device_lr=True, capturable=True)
    return cfg, d, opt, build_scheduler(cfg, opt, ITERS)


def _batches(device, n=ITERS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 8, 8, generator=gen).to(device), torch.randint(0, 10, (8,), generator=gen).to(device))
            for _ in range(n)]


def _resume_from_cpu_checkpoint(cfg, d, opt, sched, batches):
    """One eager step of a CPU run (float LR, unfused), its checkpoint through torch.save/load, restored into
    ``d``/``opt``/``sched`` with fmkt.checkpoint.restore, as `--resume` on another device does."""
    _, cpu_d, _, _ = _distiller(cfg.method.name, CPU, cfg.optim.name)
    cpu_opt = build_optimizer(cfg, cpu_d.parameters(), device_lr=False)
    cpu_sched = build_scheduler(cfg, cpu_opt, ITERS)
    step = EagerStep(cpu_d, cpu_opt, cpu_sched, False)
    for i, (x, y) in enumerate(batches[:RESUME_AT]):
        step(x.cpu(), y.cpu(), i / ITERS)
    buffer = io.BytesIO()
    torch.save(training_state(cpu_d, cpu_opt, cpu_sched, cfg.to_dict(), 0, RESUME_AT, [], {}), buffer)
    buffer.seek(0)
    restore(torch.load(buffer, weights_only=True), "ckpt", cfg.to_dict(), d, opt, sched)


def _train(method, device, path, optim="sgd", resumed=False, amp=False, **optim_options):
    cfg, d, opt, sched = _distiller(method, device, optim, **optim_options)
    batches = _batches(device)
    start = 0
    if resumed:
        _resume_from_cpu_checkpoint(cfg, d, opt, sched, batches)
        start = RESUME_AT
    graphs = HostGraphs() if device.type == "cpu" else CudaGraphs()
    step = CapturedStep(d, opt, sched, amp, graphs=graphs) if path == "captured" else EagerStep(d, opt, sched, amp)
    losses, lrs = [], []
    for i, (x, y) in enumerate(batches[start:], start=start):
        before = [p.detach().clone() for p in d.parameters() if p.requires_grad]
        losses.append(float(sum(step(x, y, i / ITERS).values()).detach()))
        grads = [p.grad for p in d.parameters() if p.requires_grad]
        after = [p.detach() for p in d.parameters() if p.requires_grad]
        num = sum(float(((b - a) * g).sum()) for b, a, g in zip(before, after, grads) if g is not None)
        den = sum(float((g * g).sum()) for g in grads if g is not None)
        lrs.append(num / den)  # the LR the update applied (plain SGD: w -= lr * g)
    return step, losses, [p.detach().clone() for p in d.parameters()], lrs, cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed-from-cpu"])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("method", list(METHODS))
def test_captured_step_trains_like_the_eager_step(method, optim, resumed, device):
    """Every registered method x SGD/AdamW x fresh/resumed from a CPU checkpoint: the step is captured (a graph
    recorded once, then replayed; no silent eager fallback) and gives the eager step's losses and weights across
    an LR milestone that falls after the capture. Emulated on the CPU: bit for bit. On CUDA: within fp32
    rounding (cuDNN may pick other algorithms inside a capture)."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    captured, lc, pc, _, _ = _train(method, device, "captured", optim, resumed)
    _, le, pe, _, _ = _train(method, device, "eager", optim, resumed)
    assert captured.failed is None and captured.graph is not None, captured.failed
    if device.type == "cpu":
        assert captured.graphs.captures == 1 and captured.graph.replays == len(lc) - WARMUP
        assert lc == le and all(torch.equal(a, b) for a, b in zip(pc, pe))
    else:
        torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=1e-5, atol=1e-6)
        for a, b in zip(pc, pe):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA (scripts/gpu_check.sh runs it on the GPU)")
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["fmkt", "kd"])
def test_captured_step_under_bf16_autocast(method, optim):
    """The same under bf16 autocast: within bf16's rounding (on an H100 the bf16 FM-KT losses drifted to 2.1e-3
    apart by step 8: convolutions may pick other algorithms inside a capture, and bf16 (eps 3.9e-3) rounds those
    differently)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    captured, lc, pc, _, _ = _train(method, CUDA, "captured", optim, amp=True)
    _, le, pe, _, _ = _train(method, CUDA, "eager", optim, amp=True)
    assert captured.failed is None and captured.graph is not None, captured.failed
    assert lc[:WARMUP] == le[:WARMUP]
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=1e-2, atol=1e-4)
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed-from-cpu"])
def test_the_lr_the_graph_applies_follows_the_schedule(resumed, device):
    """Plain SGD (no momentum, no weight decay): w -= lr * g, so the LR each captured step applied is read from the
    weights and the gradient, not from the param group. Across the milestone it must be the scheduled one (a graph
    that recorded the LR as a number keeps the old LR)."""
    step, _, _, applied, cfg = _train("kd", device, "captured", "sgd", resumed, momentum=0.0, weight_decay=0.0)
    assert step.failed is None and step.graph is not None
    start = RESUME_AT if resumed else 0
    want = [scheduled_lr(cfg, i, ITERS) for i in range(start, ITERS)]
    first_decayed = next(i for i in range(ITERS) if i / ITERS >= MILESTONE)
    assert want[-1] == pytest.approx(0.1 * want[0]) and first_decayed > start + WARMUP  # decays after the capture
    assert applied == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_nonfinite_captured_step_leaves_the_weights_untouched(optim, device):
    """The graph flags a non-finite loss before the optimiser step (found_inf): that replay and every later one
    leave the weights and optimiser state as they were, so the raise that follows keeps the promise of the eager
    step (no weight touched by a non-finite step)."""
    cfg, d, opt, sched = _distiller("fmkt", device, optim)
    graphs = HostGraphs() if device.type == "cpu" else CudaGraphs()
    step = CapturedStep(d, opt, sched, False, graphs=graphs)
    batches = _batches(device)
    for i, (x, y) in enumerate(batches[:WARMUP + 1]):
        step(x, y, i / ITERS)
    assert step.graph is not None
    # the trainable weights (BatchNorm's running statistics see the NaN batch's forward in the eager step too; the
    # run stops at the next read of the losses, before any checkpoint is written)
    frozen = {k: v.detach().clone() for k, v in d.named_parameters() if v.requires_grad}
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]]
    bad = batches[WARMUP + 1][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    losses = step(bad, batches[WARMUP + 1][1], 0.5)
    assert not bool(torch.isfinite(sum(losses.values())))
    step(*batches[WARMUP + 2], 0.6)  # a finite batch after it: still no update (the flag is sticky)
    assert float(step.found_inf) == 1.0
    for k, v in d.named_parameters():
        if v.requires_grad:
            assert torch.equal(v, frozen[k]), k
    for p, before in zip(opt.param_groups[0]["params"], moments):
        for k, v in before.items():
            assert torch.equal(opt.state[p][k], v), k


def test_dkd_steps_are_captured_once_the_warmup_ends():
    """With DKD's warm-up the step changes every epoch until the factor reaches 1: eager until then, WARMUP eager
    steps, then the capture (not a whole run kept eager)."""
    cfg, d, opt, sched = _distiller("dkd", CPU)
    step = CapturedStep(d, opt, sched, False, start=1.0, graphs=HostGraphs())
    batches = _batches(CPU, 2 * ITERS)
    for i, (x, y) in enumerate(batches):
        step(x, y, i / ITERS)
        if i == ITERS - 1:
            assert step.graph is None and step.warm == 0  # epoch 0: the ramp, eager
    assert step.failed is None and step.graphs.captures == 1 and step.graph.replays == ITERS - WARMUP


def test_a_capture_that_fails_trains_eagerly_and_says_why_once():
    """A host sync inside the step (here an .item() in the loss) cannot be captured: the run goes on eagerly
    and says so once, with the reason."""
    cfg, d, opt, sched = _distiller("kd", CPU)
    forward = d.forward_train

    def syncing(images, labels, progress=0.0):
        logits, losses = forward(images, labels, progress)
        if losses["loss_kd"].item() < 0:  # a host read inside the step
            raise AssertionError
        return logits, losses

    d.forward_train = syncing
    said = []
    step = CapturedStep(d, opt, sched, False, graphs=HostGraphs(), say=said.append)
    for i, (x, y) in enumerate(_batches(CPU)):
        step(x, y, i / ITERS)
    assert step.graph is None and "reads a tensor on the host" in step.failed
    assert len(said) == 1 and "could not be captured" in said[0] and CaptureError.__name__ in said[0]


def test_make_step_refuses_an_optimizer_a_graph_would_freeze():
    cfg, d, _, _ = _distiller("kd", CPU)
    opt = build_optimizer(cfg, d.parameters(), device_lr=False)
    printed = []
    run = SimpleNamespace(model=d, optimizer=opt, scheduler=build_scheduler(cfg, opt, ITERS), amp=False, cfg=cfg,
                          console=SimpleNamespace(print=lambda line, **kw: printed.append(line)))
    plan = capture_module.FastPath(True, True, "")
    assert type(make_step(run, plan)) is EagerStep and "Python number" in printed[0]
    run.optimizer = build_optimizer(cfg, d.parameters(), device_lr=True, capturable=True)
    assert isinstance(make_step(run, plan), CapturedStep)
    assert type(make_step(run, capture_module.FastPath(True, False, ""))) is EagerStep
