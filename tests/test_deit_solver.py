"""DeiT's solver details (the authors' mmcls config): the warm-up from a fraction of the LR, the cosine floor, no
weight decay on biases, norms and ViT tokens, gradient clipping; with every key at its default the schedule and the
optimiser are exactly what they were."""
import math

import pytest
import torch

from fmkt.config import build_config
from fmkt.errors import FmktError
from fmkt.models import create_model
from fmkt.optim import build_optimizer, decay_groups, lr_factor


def _old_lr_factor(cfg, p):
    """lr_factor before warmup_start and min_lr existed (fmkt 747d5f3), for the bit-identity check."""
    o, epochs = cfg.optim, cfg.train.epochs
    if o.warmup_epochs > 0 and p < o.warmup_epochs:
        return (p + 1e-8) / o.warmup_epochs
    span = max(epochs - o.warmup_epochs, 1e-8)
    return 0.5 * (1.0 + math.cos(math.pi * min((p - o.warmup_epochs) / span, 1.0)))


def test_default_schedule_is_bit_identical():
    cfg = build_config(None, [{"optim": {"warmup_epochs": 2.0}, "train": {"epochs": 10}}])
    for p in [0.0, 0.3, 1.99, 2.0, 5.5, 9.99, 10.0]:
        assert lr_factor(cfg, p) == _old_lr_factor(cfg, p)


def test_warm_up_start_and_cosine_floor():
    cfg = build_config(None, [{"optim": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 20.0, "warmup_start": 1e-3,
                                         "min_lr": 1e-5}, "train": {"epochs": 300}}])
    assert lr_factor(cfg, 0.0) == pytest.approx(1e-3, rel=1e-6)
    assert lr_factor(cfg, 10.0) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5, rel=1e-9)
    assert lr_factor(cfg, 20.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 160.0) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cfg.optim.lr * lr_factor(cfg, 300.0) == pytest.approx(1e-5)


def _vit():
    return create_model("timm:deit_tiny_patch16_224", num_classes=10, in_channels=3, img_size=32, patch_size=4)


def test_no_decay_groups_follow_timms_rule():
    model = _vit()
    decay, keep = decay_groups(model.named_parameters(), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)].rsplit(".", 1)[-1] for p in keep["params"]}
    assert {"cls_token", "pos_embed", "bias", "weight"} <= kept  # tokens, biases, the norms' weights
    assert all(p.ndim >= 2 for p in decay["params"]) and (decay["weight_decay"], keep["weight_decay"]) == (0.05, 0.0)
    assert not any(names[id(p)].endswith(("cls_token", "pos_embed")) for p in decay["params"])
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


def test_the_optimiser_has_the_groups_only_when_asked():
    model = _vit()
    on = build_config(None, [{"optim": {"name": "adamw", "no_decay": True, "weight_decay": 0.05}}])
    opt = build_optimizer(on, model.named_parameters())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    off = build_config(None, [{"optim": {"name": "adamw", "weight_decay": 0.05}}])
    plain = build_optimizer(off, model.named_parameters())
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.05
    assert plain.state_dict()["param_groups"] == build_optimizer(off, model.parameters()).state_dict()["param_groups"]
    with pytest.raises(FmktError, match="names"):
        build_optimizer(on, model.parameters())


@pytest.mark.parametrize("bad", [{"warmup_start": 1.5}, {"min_lr": 0.1, "lr": 0.05}, {"clip_grad": -1.0}])
def test_bad_solver_keys_are_one_sentence(bad):
    with pytest.raises(FmktError, match="optim.warmup_start must be"):
        build_config(None, [{"optim": bad}])


def test_a_decayed_step_leaves_the_no_decay_group_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = build_config(None, [{"optim": {"name": "adamw", "no_decay": True, "weight_decay": 0.5, "lr": 0.1}}])
    opt = build_optimizer(cfg, model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay moves a parameter
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"0.weight"}


def test_the_solver_keys_at_their_defaults_keep_the_teacher_cache_key():
    """A default teacher cached before these keys existed keeps its key; set, they make another."""
    from fmkt.commands import _LATER_OPTIM_KEYS, teacher_cache_key, teacher_config
    from fmkt.config import OptimConfig

    assert all(_LATER_OPTIM_KEYS[k] == getattr(OptimConfig(), k) for k in _LATER_OPTIM_KEYS)
    t = teacher_config(build_config(None))
    key = teacher_cache_key(t)
    assert key == "443859da010cdf50"  # the default digits teacher's key before these keys existed (its cache folder)
    t.optim.__dict__.update(_LATER_OPTIM_KEYS)
    assert teacher_cache_key(t) == key
    t.optim.clip_grad = 5.0
    assert teacher_cache_key(t) != key
    legacy = {k: v for k, v in t.optim.__dict__.items() if k not in _LATER_OPTIM_KEYS}
    assert set(legacy) | set(_LATER_OPTIM_KEYS) == set(OptimConfig().__dict__)


def _grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def test_clipping_bounds_the_gradients_in_the_eager_and_the_captured_step():
    """optim.clip_grad: every step's gradients have a global norm of at most the bound (without it they exceed
    it), and the captured step (emulated on the CPU) clips as the eager one does, bit for bit."""
    from graph_emulator import HostGraphs
    from test_capture import CPU, ITERS, _batches, _distiller

    from fmkt.capture import CapturedStep, EagerStep

    bound, weights = 0.01, {}
    _, d, opt, sched = _distiller("fmkt", CPU, "sgd")
    x, y = _batches(CPU)[0]
    EagerStep(d, opt, sched, False)(x, y, 0.0)
    assert _grad_norm(d) > 2 * bound  # unclipped
    for path in ("eager", "captured"):
        _, d, opt, sched = _distiller("fmkt", CPU, "sgd")
        step = (CapturedStep(d, opt, sched, False, bound, graphs=HostGraphs()) if path == "captured"
                else EagerStep(d, opt, sched, False, bound))
        for i, (x, y) in enumerate(_batches(CPU)):
            step(x, y, i / ITERS)
            assert _grad_norm(d) <= bound * (1 + 1e-4)
        weights[path] = [p.detach().clone() for p in d.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights["eager"], weights["captured"]))


def test_the_run_s_step_clips_at_optim_clip_grad():
    from types import SimpleNamespace

    from fmkt.capture import FastPath, make_step

    cfg = build_config(None, [{"optim": {"clip_grad": 5.0}}])
    run = SimpleNamespace(cfg=cfg, model=None, optimizer=None, scheduler=None, amp=False, console=None)
    assert make_step(run, FastPath(False, False, "off")).clip == 5.0
