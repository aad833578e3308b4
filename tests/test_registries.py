"""The registries are the only lists of names, and registering is what gets a thing tested.

Every method (fmkt.distillers.METHODS) trains one step with every metric loss (fmkt.losses.LOSSES); every
encoder and schedule is trained in tests/test_flow.py from ENCODERS and SCHEDULES; the CLI, `info --models`,
config checks and fmkt.json read these dicts, never a list of their own (the one copy, fmkt/names.py's tuples for
`--help`, which must not import torch, is held equal to them here).
"""
import math

import pytest
import torch

from fmkt.config import MethodConfig
from fmkt.distillers import METHODS, build_distiller
from fmkt.engine import train_step
from fmkt.losses import LOSSES
from fmkt.student import StudentSpec, build_student, spec_of

MEAN, STD = (0.5,), (0.25,)


def _student(method):
    m = METHODS[method]
    spec = StudentSpec(arch="resnet8", num_classes=5, channels=1, size=(8, 8), mean=MEAN, std=STD,
                       encoder="conv" if m.flow else None, theta_head=m.theta, default_steps=2)
    return build_student(spec)


def _cases():
    """Every method x every loss with logit standardization off, and on wherever the method's D is a logit loss
    (a flow method's D is method.loss; a baseline's is its own loss, whatever method.loss says)."""
    for method, m in METHODS.items():
        for loss, entry in LOSSES.items():
            yield pytest.param(method, loss, False, id=f"{method}-{loss}")
            if entry.logits and (m.flow or m.options.get("loss_name") == loss):
                yield pytest.param(method, loss, True, id=f"{method}-{loss}-ls")


@pytest.mark.parametrize("method,loss,ls", list(_cases()))
def test_every_method_trains_one_step_with_every_loss(method, loss, ls):
    torch.manual_seed(0)
    m = METHODS[method]
    teacher = None
    if m.needs_teacher:
        teacher = build_student(StudentSpec(arch="resnet8", num_classes=5, channels=1, size=(8, 8), mean=MEAN,
                                            std=STD)).eval()
    cfg = MethodConfig(name=method, loss=loss, train_steps="2", dkd_warmup_epochs=0, logit_standardization=ls)
    distiller = build_distiller(cfg, _student(method), teacher, input_shape=(1, 8, 8)).train()
    assert getattr(getattr(distiller, "metric", None), "standardize", False) is ls  # LS reached the metric loss
    params = [p for p in distiller.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.01)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    losses = train_step(distiller, opt, None, x, y, 0.5)
    assert losses and all(math.isfinite(v.item()) for v in losses.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))  # the step trained something
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())


def test_build_student_and_spec_of_round_trip():
    """The one builder and its reader: spec -> model -> spec is the identity, and the rebuilt model has the same
    weights layout and output."""
    spec = StudentSpec(arch="resnet8", num_classes=4, channels=1, size=(8, 8), mean=(0.3,), std=(0.4,),
                       encoder="mlp", encoder_params={"depth": 1}, schedule="vp", transfer="features",
                       theta_head=True, default_steps=4)
    model = build_student(spec).eval()
    back = spec_of(model)
    assert back == spec.__class__(**{**spec.__dict__, "num_features": model.num_features})
    assert StudentSpec.from_json(back.to_json()) == back
    rebuilt = build_student(StudentSpec.from_json(back.to_json())).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    model.default_steps = 2
    assert spec_of(model).default_steps == 2  # what is saved is the model as it is now


def test_names_are_listed_once():
    """METHODS and LOSSES are the only lists: the views other code reads are derived from them, and no product
    module spells a list of method names again."""
    import pathlib
    import re

    from fmkt.losses import DEFAULT_LOSS_PARAMS, METRIC_LOSSES

    assert METRIC_LOSSES == tuple(LOSSES) and DEFAULT_LOSS_PARAMS == {k: v.defaults for k, v in LOSSES.items()}
    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""["']fmkt["']\s*,\s*["']theta["']|["']kd["']\s*,\s*["']dkd["']""")
    hits = [f"{p.relative_to(root)}" for d in ("fmkt", "export", "bench", "cli", "benchmarks") if (root / d).is_dir()
            for p in (root / d).rglob("*.py") if pattern.search(p.read_text())]
    assert hits == ["fmkt/names.py"], hits  # the torch-free tuples for --help, held equal to the registries below


def test_the_torch_free_name_tuples_are_the_registries_keys():
    """fmkt.names (what `fmkt-cli distill --help` prints without importing torch) is each registry's keys, in order."""
    from fmkt.flow.encoders import ENCODERS
    from fmkt.flow.schedules import SCHEDULES
    from fmkt.names import ENCODER_NAMES, LOSS_NAMES, METHOD_NAMES, SCHEDULE_NAMES

    assert METHOD_NAMES == tuple(METHODS)
    assert LOSS_NAMES == tuple(LOSSES)
    assert ENCODER_NAMES == tuple(ENCODERS)
    assert SCHEDULE_NAMES == tuple(SCHEDULES)
