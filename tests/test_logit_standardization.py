"""Logit standardization (LS; Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

LS z-scores every logit vector, the student's and the teacher's, before the temperature softmax of a logit loss
(kd, dkd, dist): ``(z - mean(z)) / (1e-7 + std(z))`` over the classes, std unbiased. It is one option of the
metric loss (``build_metric_loss(name, standardize=True)``, config ``method.logit_standardization``), so it
reaches the baselines and the FM-KT family alike. Checked here: a hand computation, the authors' own code (copied
below), the invariances LS exists for, and one training step of every flow method with every logit loss.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fmkt.commands import check_method_names
from fmkt.config import MethodConfig
from fmkt.distillers import METHODS, build_distiller
from fmkt.engine import train_step
from fmkt.errors import FmktError
from fmkt.losses import LOGIT_LOSSES, LOSSES, build_metric_loss, standardize_logits
from fmkt.student import StudentSpec, build_student

S = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [-3.0, 0.0, 1.0, 7.0]]
T = [[2.0, 0.0, 6.0, 1.0], [3.0, 1.0, -2.0, 0.0], [0.0, 0.0, 1.0, 0.5]]
Y = [2, 0, 3]


# ------------------------------------------------------------------ the authors' code, copied as the reference
# sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
# mdistiller/distillers/KD.py (normalize, kd_loss) and mdistiller/distillers/DKD.py (dkd_loss and its helpers);
# the one change: F.kl_div(..., size_average=False) is written as reduction="sum" (the same sum, no warning).
def authors_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def authors_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = authors_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = authors_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def _cat_mask(t, mask1, mask2):
    return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)


def authors_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    logits_student = authors_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = authors_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()
    pred_student = _cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = _cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd_loss = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2
                 / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


# The LS authors ship no DIST; DIST's reference is its authors' loss: hunto/image_classification_sota
# @ d9662f7df68fe46b973c4580b7c9b896cedcd301 (the DIST_KD submodule), lib/models/losses/dist_kd.py.
def authors_dist_loss(z_s, z_t, beta, gamma, tau):
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.t(), y_t.t()).mean())
    return beta * inter + gamma * intra


# ------------------------------------------------------------------ the hand computation (plain Python floats)
def hand_zscore(row):
    k = len(row)
    mean = sum(row) / k
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (k - 1))  # unbiased, as torch.std and the authors
    return [(v - mean) / (1e-7 + std) for v in row]


def hand_softmax(row, temp):
    m = max(row)
    e = [math.exp((v - m) / temp) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(p, q):  # KL(p || q)
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def hand_kd(s, t, temp):
    return temp**2 * sum(hand_kl(hand_softmax(b, temp), hand_softmax(a, temp)) for a, b in zip(s, t)) / len(s)


def hand_dkd(s, t, y, alpha, beta, temp):
    total = 0.0
    for a, b, g in zip(s, t, y):
        ps, pt = hand_softmax(a, temp), hand_softmax(b, temp)
        tckd = hand_kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        rest_s = [v for k, v in enumerate(a) if k != g]
        rest_t = [v for k, v in enumerate(b) if k != g]
        nckd = hand_kl(hand_softmax(rest_t, temp), hand_softmax(rest_s, temp))
        total += alpha * tckd + beta * nckd
    return temp**2 * total / len(s)


def hand_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def hand_dist(s, t, beta, gamma, tau):
    ys, yt = [hand_softmax(r, tau) for r in s], [hand_softmax(r, tau) for r in t]
    inter = 1 - sum(hand_pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(hand_pearson([r[k] for r in ys], [r[k] for r in yt]) for k in cols) / len(cols)
    return tau**2 * (beta * inter + gamma * intra)


def tensors():
    return torch.tensor(S, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), torch.tensor(Y)


def test_zscore_is_the_authors_golden_values():
    """[1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3), so +-1.5/sqrt(5/3) and +-0.5/sqrt(5/3); the biased std
    (sqrt(1.25)) would give +-1.3416 instead."""
    z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))[0].tolist()
    assert z == pytest.approx([-1.161895003862225, -0.3872983346207417, 0.3872983346207417, 1.161895003862225],
                              rel=1e-6)
    s, t, _ = tensors()
    for rows, x in ((S, s), (T, t)):
        for got, row in zip(standardize_logits(x).tolist(), rows):
            assert got == pytest.approx(hand_zscore(row), rel=1e-12)
        assert torch.equal(standardize_logits(x), authors_normalize(x))  # the same expression, bit for bit
    zero_var = standardize_logits(torch.full((1, 5), 3.0))
    assert torch.equal(zero_var, torch.zeros(1, 5))  # a constant row: 0 / 1e-7, no NaN
    low = s.to(torch.bfloat16)  # a student's logits under CUDA's bf16 autocast: standardized in fp32
    assert standardize_logits(low).dtype == torch.float32
    assert torch.equal(standardize_logits(low), standardize_logits(low.float()))


@pytest.mark.parametrize("params", [{"temperature": 2.0}, {"temperature": 3.0}, {"temperature": 4.0}])
def test_kd_with_ls_matches_hand_and_authors(params):
    s, t, _ = tensors()
    got = build_metric_loss("kd", standardize=True, **params)(s, t).item()
    temp = params["temperature"]
    zs, zt = [hand_zscore(r) for r in S], [hand_zscore(r) for r in T]
    assert got == pytest.approx(hand_kd(zs, zt, temp), rel=1e-9)
    assert got == pytest.approx(authors_kd_loss(s, t, temp, True).item(), rel=1e-12)
    assert build_metric_loss("kd", **params)(s, t).item() == pytest.approx(hand_kd(S, T, temp), rel=1e-9)


@pytest.mark.parametrize("alpha,beta,temp", [(9.0, 72.0, 2.0), (18.0, 36.0, 3.0), (1.0, 8.0, 4.0)])
def test_dkd_with_ls_matches_hand_and_authors(alpha, beta, temp):
    s, t, y = tensors()
    loss = build_metric_loss("dkd", standardize=True, alpha=alpha, beta=beta, temperature=temp)
    got = loss(s, t, y).item()
    zs, zt = [hand_zscore(r) for r in S], [hand_zscore(r) for r in T]
    assert got == pytest.approx(hand_dkd(zs, zt, Y, alpha, beta, temp), rel=1e-7)
    assert got == pytest.approx(authors_dkd_loss(s, t, y, alpha, beta, temp, True).item(), rel=1e-12)
    assert loss(s, t, y, warmup_factor=0.25).item() == pytest.approx(0.25 * got, rel=1e-12)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 2.0, 1.0)])
def test_dist_with_ls_matches_hand_and_authors(beta, gamma, tau):
    s, t, _ = tensors()
    got = build_metric_loss("dist", standardize=True, beta=beta, gamma=gamma, tau=tau)(s, t).item()
    zs, zt = [hand_zscore(r) for r in S], [hand_zscore(r) for r in T]
    assert got == pytest.approx(hand_dist(zs, zt, beta, gamma, tau), rel=1e-6)
    want = authors_dist_loss(authors_normalize(s), authors_normalize(t), beta, gamma, tau).item()
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_ls_makes_the_loss_blind_to_each_side_s_shift_and_scale(name):
    """What LS is for: the student need not match the teacher's logit range. Each row of either side may be
    shifted and scaled (by a positive factor) without changing the loss, and LS on one side only would break
    this on the other side."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g, dtype=torch.float64), 3 * torch.randn(6, 10, generator=g,
                                                                                  dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    scale, shift = torch.rand(6, 1, generator=g, dtype=torch.float64) * 5 + 0.2, torch.randn(6, 1, generator=g)
    on, off = build_metric_loss(name, standardize=True), build_metric_loss(name)
    base = on(s, t, y).item()
    assert on(s * scale + shift, t, y).item() == pytest.approx(base, rel=1e-6)
    assert on(s, t * scale + shift, y).item() == pytest.approx(base, rel=1e-6)
    assert off(s, t * scale + shift, y).item() != pytest.approx(off(s, t, y).item(), rel=1e-3)


def test_ls_is_refused_for_losses_that_are_not_logit_losses():
    assert set(LOGIT_LOSSES) == {"kd", "dkd", "dist"} and set(LOSSES) - set(LOGIT_LOSSES) == {"pkd", "mse"}
    for name in set(LOSSES) - set(LOGIT_LOSSES):
        with pytest.raises(FmktError, match="softmax logit losses"):
            build_metric_loss(name, standardize=True)
        with pytest.raises(FmktError, match=f"logit_standardization .* not with method.loss={name}"):
            check_method_names(MethodConfig(name="fmkt", loss=name, logit_standardization=True))
        check_method_names(MethodConfig(name="fmkt", loss=name))  # off: fine
    with pytest.raises(FmktError, match="method.logit_standardization: true"):  # a sentence, not a TypeError
        check_method_names(MethodConfig(name="kd", loss_params={"standardize": True}))
    with pytest.raises(FmktError, match="not with method.transfer=features"):
        check_method_names(MethodConfig(name="fmkt", loss="kd", transfer="features", logit_standardization=True))
    # the baselines build their own D (kd/dkd/dist), whatever method.loss says; the student alone has none
    for name, m in METHODS.items():
        if not m.flow:
            check_method_names(MethodConfig(name=name, loss="pkd", logit_standardization=True))


# ------------------------------------------------------------------ LS inside the FM-KT family and the baselines
MEAN, STD = (0.5,), (0.25,)
FLOW_METHODS = [n for n, m in METHODS.items() if m.flow]


def _distiller(method, loss, ls):
    torch.manual_seed(0)
    m = METHODS[method]
    spec = dict(arch="resnet8", num_classes=5, channels=1, size=(8, 8), mean=MEAN, std=STD)
    teacher = build_student(StudentSpec(**spec)).eval() if m.needs_teacher else None
    student = build_student(StudentSpec(**spec, encoder="conv" if m.flow else None, theta_head=m.theta,
                                        default_steps=2))
    cfg = MethodConfig(name=method, loss=loss, train_steps="2", dkd_warmup_epochs=0, logit_standardization=ls)
    check_method_names(cfg)
    return build_distiller(cfg, student, teacher, input_shape=(1, 8, 8)).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


@pytest.mark.parametrize("loss", LOGIT_LOSSES)
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_ls_inside_the_flow_methods_trains(method, loss):
    x, y = _batch()
    off = _distiller(method, loss, False)
    with torch.no_grad():
        _, losses_off = off.forward_train(x, y, 0.5)
    d = _distiller(method, loss, True)
    assert d.metric.standardize is True and off.metric.standardize is False
    params = [p for p in d.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        _, losses_on = d.forward_train(x, y, 0.5)
    assert losses_on["loss_ce"].item() == pytest.approx(losses_off["loss_ce"].item(), rel=1e-6)  # CE untouched
    assert losses_on["loss_kd"].item() != pytest.approx(losses_off["loss_kd"].item(), rel=1e-3)  # D is not
    losses = train_step(d, torch.optim.SGD(params, lr=0.01), None, x, y, 0.5)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))


TEACHER_CASES = [(n, loss) for n, m in METHODS.items() if m.needs_teacher for loss in LOGIT_LOSSES
                 if m.flow or m.options.get("loss_name") == loss]  # a baseline's D is its own loss


@pytest.mark.parametrize("method,loss", TEACHER_CASES)
def test_ls_sees_the_teacher_standardized_in_every_teacher_method(method, loss):
    """Scaling and shifting each teacher row changes nothing with LS (FM-KT's D at every step, theta, and the
    baselines), and changes the loss without it: the teacher's logits are standardized too."""
    x, y = _batch()
    for ls in (True, False):
        d = _distiller(method, loss, ls)
        with torch.no_grad():
            _, plain = d.forward_train(x, y, 0.5)
            teacher_logits = d.teacher_logits
            d.teacher_logits = lambda images: 4.0 * teacher_logits(images) + 2.5
            _, moved = d.forward_train(x, y, 0.5)
        same = moved["loss_kd"].item() == pytest.approx(plain["loss_kd"].item(), rel=1e-5)
        assert same is ls, (method, loss, ls)
