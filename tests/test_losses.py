"""Tests of fmkt.losses: pinned golden values, analytic cases and independent references.

Golden values live in tests/fixtures/golden_losses.json; the inputs are rebuilt from the recipe in
`make_inputs` (also written into the fixture). Regenerate after an intended math change with
`python tests/test_losses.py --regen` and review the diff.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmkt.errors import FmktError
from fmkt.losses import (
    DEFAULT_LOSS_PARAMS,
    METRIC_LOSSES,
    build_metric_loss,
    ce_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    mse_loss,
    pkd_loss,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_losses.json"

RECIPE = [
    "g = torch.Generator().manual_seed(0)  # CPU, float32, drawn in this order",
    "logits_s = torch.randn(8, 10, generator=g) * 2",
    "logits_t = torch.randn(8, 10, generator=g) * 3",
    "target = torch.randint(0, 10, (8,), generator=g)",
    "feat_s = torch.randn(4, 6, 5, 5, generator=g)",
    "feat_t = 0.5 * feat_s + torch.randn(4, 6, 5, 5, generator=g)",
    "vec_s = torch.randn(16, 12, generator=g)",
    "vec_t = vec_s + torch.randn(16, 12, generator=g)",
]


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x: dict[str, torch.Tensor] = {}
    x["logits_s"] = torch.randn(8, 10, generator=g) * 2
    x["logits_t"] = torch.randn(8, 10, generator=g) * 3
    x["target"] = torch.randint(0, 10, (8,), generator=g)
    x["feat_s"] = torch.randn(4, 6, 5, 5, generator=g)
    x["feat_t"] = 0.5 * x["feat_s"] + torch.randn(4, 6, 5, 5, generator=g)
    x["vec_s"] = torch.randn(16, 12, generator=g)
    x["vec_t"] = x["vec_s"] + torch.randn(16, 12, generator=g)
    return x


def compute_cases(x: dict[str, torch.Tensor]) -> dict[str, float]:
    s, t, y = x["logits_s"], x["logits_t"], x["target"]
    return {
        "ce": ce_loss(s, y).item(),
        "ce_ls0.1": ce_loss(s, y, label_smoothing=0.1).item(),
        "kd_T4": kd_loss(s, t).item(),
        "kd_T1": kd_loss(s, t, temperature=1.0).item(),
        "dkd_a1_b2_T4": dkd_loss(s, t, y).item(),
        "dkd_a1_b8_T4_w0.5": dkd_loss(s, t, y, alpha=1.0, beta=8.0, warmup_factor=0.5).item(),
        "dist_b2_g2_tau1": dist_loss(s, t).item(),
        "dist_b1_g1_tau4": dist_loss(s, t, beta=1.0, gamma=1.0, tau=4.0).item(),
        "pkd_4d": pkd_loss(x["feat_s"], x["feat_t"]).item(),
        "pkd_2d": pkd_loss(x["vec_s"], x["vec_t"]).item(),
        "mse_4d": mse_loss(x["feat_s"], x["feat_t"]).item(),
    }


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return make_inputs()


# ----------------------------------------------------------------------------- golden values


def test_golden_values(inputs):
    golden = json.loads(GOLDEN.read_text())
    assert golden["recipe"] == RECIPE, "fixture recipe and make_inputs() drifted apart"
    got = compute_cases(inputs)
    assert set(got) == set(golden["values"])
    for name, want in golden["values"].items():
        assert got[name] == pytest.approx(want, rel=1e-5, abs=1e-7), name


def test_builder_matches_functions(inputs):
    s, t, y = inputs["logits_s"], inputs["logits_t"], inputs["target"]
    fs, ft = inputs["feat_s"], inputs["feat_t"]
    assert build_metric_loss("kd")(s, t).item() == pytest.approx(kd_loss(s, t).item())
    assert build_metric_loss("kd", temperature=1)(s, t).item() == pytest.approx(
        kd_loss(s, t, temperature=1.0).item())
    assert build_metric_loss("dkd", beta=8.0)(s, t, y, 0.5).item() == pytest.approx(
        dkd_loss(s, t, y, beta=8.0, warmup_factor=0.5).item())
    assert build_metric_loss("dist")(s, t, y, 0.3).item() == pytest.approx(dist_loss(s, t).item())
    assert build_metric_loss("pkd")(fs, ft).item() == pytest.approx(pkd_loss(fs, ft).item())
    assert build_metric_loss("mse")(fs, ft).item() == pytest.approx(mse_loss(fs, ft).item())
    assert set(DEFAULT_LOSS_PARAMS) == set(METRIC_LOSSES)
    assert DEFAULT_LOSS_PARAMS["dkd"] == {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}
    assert DEFAULT_LOSS_PARAMS["dist"] == {"beta": 2.0, "gamma": 2.0, "tau": 1.0}


def test_builder_errors():
    with pytest.raises(FmktError, match="kd, dkd, dist, pkd, mse"):
        build_metric_loss("nope")
    with pytest.raises(FmktError, match="alpha, beta, temperature"):
        build_metric_loss("dkd", gamma=1.0)
    with pytest.raises(FmktError, match="none"):
        build_metric_loss("mse", temperature=2.0)
    with pytest.raises(FmktError, match="positive"):
        build_metric_loss("kd", temperature=0)
    with pytest.raises(FmktError, match="number"):
        build_metric_loss("dist", tau="1")
    with pytest.raises(FmktError, match="target"):
        build_metric_loss("dkd")(torch.zeros(2, 3), torch.zeros(2, 3))


def test_shape_mismatch_raises():
    with pytest.raises(FmktError, match="same dataset"):
        kd_loss(torch.zeros(4, 10), torch.zeros(4, 100))
    with pytest.raises(FmktError):
        pkd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# ----------------------------------------------------------------------------- analytic cases


def test_identical_inputs_give_zero(inputs):
    s, y = inputs["logits_s"], inputs["target"]
    assert kd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # DKD of identical logits: both KL terms vanish; what remains is float rounding between
    # log(softmax) and log_softmax (measured ~1e-7, allow 1e-5).
    assert abs(dkd_loss(s, s.clone(), y).item()) < 1e-5
    # DIST: Pearson of a vector with itself is |a|^2 / (|a|^2 + 1e-8), so ~1e-6 from 1.
    assert dist_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-4)
    assert mse_loss(inputs["feat_s"], inputs["feat_s"].clone()).item() == 0.0
    assert pkd_loss(inputs["feat_s"], inputs["feat_s"].clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert pkd_loss(inputs["vec_s"], inputs["vec_s"].clone()).item() == pytest.approx(0.0, abs=1e-10)


def test_pkd_is_scale_and_shift_invariant_per_channel(inputs):
    fs, ft = inputs["feat_s"], inputs["feat_t"]
    scale = torch.arange(1, 7, dtype=torch.float32).view(1, 6, 1, 1)
    assert pkd_loss(fs * scale + 3.0, ft).item() == pytest.approx(pkd_loss(fs, ft).item(), rel=1e-4)


def test_kd_grows_with_disagreement(inputs):
    t = inputs["logits_t"]
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    values = [kd_loss(t + a * noise, t).item() for a in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_ce_label_smoothing_hand_formula(inputs):
    s, y = inputs["logits_s"].double(), inputs["target"]
    eps, k = 0.1, s.shape[1]
    logp = s - s.logsumexp(1, keepdim=True)
    q = torch.full_like(s, eps / k)
    q[torch.arange(len(y)), y] += 1 - eps
    want = -(q * logp).sum(1).mean().item()
    assert ce_loss(inputs["logits_s"], y, label_smoothing=eps).item() == pytest.approx(want, rel=1e-5)
    plain = -logp[torch.arange(len(y)), y].mean().item()
    assert ce_loss(inputs["logits_s"], y).item() == pytest.approx(plain, rel=1e-5)


def test_kd_hand_kl_formula(inputs):
    s = inputs["logits_s"].double().numpy()
    t = inputs["logits_t"].double().numpy()
    T = 4.0

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(s / T), softmax(t / T)
    want = T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    assert kd_loss(inputs["logits_s"], inputs["logits_t"]).item() == pytest.approx(want, rel=1e-5)


def reference_dkd(s, t, y, alpha, beta, T):
    """DKD written from the paper's definitions in float64, one sample at a time."""
    total = 0.0
    for i in range(s.shape[0]):
        ps = torch.softmax(s[i].double() / T, 0)
        pt = torch.softmax(t[i].double() / T, 0)
        g = int(y[i])
        bs = torch.stack([ps[g], 1 - ps[g]])
        bt = torch.stack([pt[g], 1 - pt[g]])
        tckd = (bt * (bt.log() - bs.log())).sum()
        keep = [k for k in range(s.shape[1]) if k != g]
        qs = torch.softmax(s[i, keep].double() / T, 0)
        qt = torch.softmax(t[i, keep].double() / T, 0)
        nckd = (qt * (qt.log() - qs.log())).sum()
        total += float(alpha * tckd + beta * nckd)
    return T * T * total / s.shape[0]


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 2.0, 4.0), (1.0, 8.0, 4.0), (0.5, 1.0, 1.0)])
def test_dkd_matches_independent_reference(inputs, alpha, beta, T):
    s, t, y = inputs["logits_s"], inputs["logits_t"], inputs["target"]
    want = reference_dkd(s, t, y, alpha, beta, T)
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T).item()
    assert got == pytest.approx(want, rel=1e-4)


def test_dkd_warmup_scales_linearly(inputs):
    s, t, y = inputs["logits_s"], inputs["logits_t"], inputs["target"]
    full = dkd_loss(s, t, y).item()
    for w in (0.0, 0.25, 0.5, 1.0):
        assert dkd_loss(s, t, y, warmup_factor=w).item() == pytest.approx(w * full, rel=1e-6, abs=1e-9)


def test_dist_matches_numpy_corrcoef(inputs):
    s, t = inputs["logits_s"], inputs["logits_t"]
    ys = torch.softmax(s.double(), 1).numpy()
    yt = torch.softmax(t.double(), 1).numpy()
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(ys.shape[1])])
    assert dist_loss(s, t, beta=1.0, gamma=0.0).item() == pytest.approx(inter, rel=1e-4)
    assert dist_loss(s, t, beta=0.0, gamma=1.0).item() == pytest.approx(intra, rel=1e-4)
    assert dist_loss(s, t).item() == pytest.approx(2 * inter + 2 * intra, rel=1e-4)


def test_pkd_matches_numpy_reference(inputs):
    fs, ft = inputs["feat_s"].double().numpy(), inputs["feat_t"].double().numpy()

    def norm(f):
        f = np.moveaxis(f, 1, 0).reshape(f.shape[1], -1)
        return (f - f.mean(1, keepdims=True)) / (f.std(1, ddof=1, keepdims=True) + 1e-6)

    want = np.mean((norm(fs) - norm(ft)) ** 2) / 2
    assert pkd_loss(inputs["feat_s"], inputs["feat_t"]).item() == pytest.approx(want, rel=1e-5)


def test_gradients_are_finite(inputs):
    y = inputs["target"]
    for name in METRIC_LOSSES:
        if name in ("pkd", "mse"):
            s = inputs["feat_s"].clone().requires_grad_(True)
            t = inputs["feat_t"]
        else:
            s = inputs["logits_s"].clone().requires_grad_(True)
            t = inputs["logits_t"]
        loss = build_metric_loss(name)(s, t, y, 1.0)
        loss.backward()
        assert torch.isfinite(loss)
        assert s.grad is not None and torch.isfinite(s.grad).all(), name
        assert s.grad.abs().sum() > 0, name
    # large logits (confident teacher) stay finite too
    s = (inputs["logits_s"] * 10).requires_grad_(True)
    loss = dkd_loss(s, inputs["logits_t"] * 10, y) + kd_loss(s, inputs["logits_t"] * 10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def _regenerate() -> None:
    values = compute_cases(make_inputs())
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "about": "Golden values of fmkt.losses on the inputs built by `recipe` (torch CPU, "
                 "float32); each case key names the loss and its non-default parameters. "
                 "Regenerate with `python tests/test_losses.py --regen`.",
        "recipe": RECIPE,
        "values": {k: float(f"{v:.9g}") for k, v in values.items()},
    }, indent=2) + "\n")
    assert all(math.isfinite(v) for v in values.values())


if __name__ == "__main__" and "--regen" in sys.argv:
    _regenerate()
