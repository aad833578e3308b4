"""The FM-KT family's losses computed by hand on a tiny case, and training across every schedule x transfer.

The tiny case (B = 3, C = 2, 1x1 maps, 3 classes, N = 2, rectified flow): the backbone's map is the image itself,
the meta-encoder is a fixed 1x1 conv W (no bias), the time embedding is zero, the head is a fixed linear layer and
the teacher a fixed linear map. Then, by the method (docs/method.md):
    v1 = W z1,  est1 = z1 - v1,  x1 = z1 - v1 / 2,  v2 = W x1,  est2 = z1 - v2,  y_i = head(est_i)
    loss_kd = (w / N) sum_i KD(y_i, Z0),  loss_ce = (ce / N) sum_i CE(y_i, labels),  logits = mean_i y_i
Each expected value below is written from these lines with plain tensor ops, never through the sampler, so a
distiller that sums instead of averaging, skips the Dirac ratio or fails to detach a target is caught.
"""
import math

import pytest
import torch
from torch import nn

from fmkt.config import MethodConfig
from fmkt.distillers import apply_dirac_ratio, build_distiller
from fmkt.flow.schedules import SCHEDULES
from fmkt.losses import ce_loss, dist_loss, kd_loss
from fmkt.models import create_model
from fmkt.student import DeployableModel

W = torch.tensor([[0.3, -0.2], [0.5, 0.1]])
HEAD_W = torch.tensor([[1.0, -0.5], [0.2, 0.8], [-0.7, 0.4]])
HEAD_B = torch.tensor([0.1, -0.2, 0.05])
TEACHER = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, 1.0]])
X = torch.tensor([[1.0, -0.5], [0.3, 0.9], [-1.2, 0.4]])
LABELS = torch.tensor([0, 2, 1])


class MapIsImage(nn.Module):
    """A backbone with the zoo interface whose feature map is its input (B, 2, 1, 1), with a fixed linear head."""

    num_features = 2

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(HEAD_W)
            self.fc.bias.copy_(HEAD_B)

    def forward_features(self, x):
        return x

    def get_classifier(self):
        return self.fc

    def forward_head(self, z):
        return self.fc(z.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(x)


class FixedTeacher(nn.Module):
    def forward(self, x):
        return x.flatten(1) @ TEACHER


def tiny(method="fmkt", loss="kd", **cfg):
    student = DeployableModel(MapIsImage(), (0.0, 0.0), (1.0, 1.0), encoder=nn.Conv2d(2, 2, 1, bias=False),
                              theta_head=method == "theta")
    with torch.no_grad():
        student.encoder.weight.copy_(W.view(2, 2, 1, 1))
        for p in student.time_embed.mlp[2].parameters():
            p.zero_()  # e(t) = 0
        if student.theta_head is not None:
            student.theta_head.weight.copy_(HEAD_W.flip(0))
            student.theta_head.bias.zero_()
    config = MethodConfig(name=method, loss=loss, train_steps="2", **cfg)
    teacher = None if method == "ofmkt" else FixedTeacher()
    return build_distiller(config, student, teacher).train()


def by_hand(w_enc=W):
    """(y1, y2) of the tiny case, from the method's lines (module docstring)."""
    z1 = X
    v1 = z1 @ w_enc.T
    x1 = z1 - v1 / 2
    v2 = x1 @ w_enc.T
    return [(z1 - v) @ HEAD_W.T + HEAD_B for v in (v1, v2)]


def images():
    return X.view(3, 2, 1, 1).clone()


def test_fmkt_loss_equals_the_hand_computation():
    d = tiny(loss_weight=0.7, ce_weight=0.4)
    logits, losses = d(images(), LABELS)
    ys, z0 = by_hand(), X @ TEACHER
    want_kd = 0.7 / 2 * sum(kd_loss(y, z0, 4.0) for y in ys)  # averaged over N = 2 steps, not summed
    want_ce = 0.4 / 2 * sum(ce_loss(y, LABELS) for y in ys)
    torch.testing.assert_close(losses["loss_kd"], want_kd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses["loss_ce"], want_ce, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits, (ys[0] + ys[1]) / 2)
    assert set(losses) == {"loss_kd", "loss_ce"}


def test_fmkt_applies_the_dirac_ratio_to_the_teacher_targets():
    """dirac_ratio 0: every row takes another row's teacher target, with the permutation apply_dirac_ratio draws."""
    ys, z0 = by_hand(), X @ TEACHER
    torch.manual_seed(5)
    shuffled = apply_dirac_ratio(z0, 0.0)
    assert not torch.equal(shuffled, z0)
    want = 0.5 * sum(kd_loss(y, shuffled, 4.0) for y in ys)
    unshuffled = 0.5 * sum(kd_loss(y, z0, 4.0) for y in ys)
    assert abs(float(want - unshuffled)) > 1e-3  # the test can tell the two apart
    d = tiny(dirac_ratio=0.0)
    torch.manual_seed(5)  # the distiller's first random draw is the Dirac permutation
    _, losses = d(images(), LABELS)
    torch.testing.assert_close(losses["loss_kd"], want, rtol=1e-6, atol=1e-7)


def test_theta_head_matches_the_detached_ensemble():
    d = tiny("theta", theta_weight=0.6, ce_weight=0.5)
    logits, losses = d(images(), LABELS)
    ys = by_hand()
    theta = X @ HEAD_W.flip(0).T
    want = 0.6 * (kd_loss(theta, (ys[0] + ys[1]) / 2, 4.0) + 0.5 * ce_loss(theta, LABELS))
    torch.testing.assert_close(losses["loss_theta"], want, rtol=1e-6, atol=1e-7)
    # the target is detached: the theta loss trains the theta head (and the backbone), never the flow
    grads = torch.autograd.grad(losses["loss_theta"], [d.student.encoder.weight, d.student.theta_head.weight],
                                allow_unused=True)
    assert grads[0] is None or float(grads[0].abs().max()) == 0.0
    assert float(grads[1].abs().max()) > 0


def test_ofmkt_target_is_the_detached_step_mean():
    """OFM-KT: D(y_i, mean(y).detach()); the gradient must equal the hand computation with the target detached
    (a target left attached adds its own gradient, so the two would differ). D is DIST here: for KD or MSE the
    target's own gradient happens to vanish when the target is the mean of the y_i, so they could not tell."""
    d = tiny("ofmkt", loss="dist", loss_weight=1.0, ce_weight=1.0, online_label_smoothing=0.1)
    _, losses = d(images(), LABELS)
    w_enc = d.student.encoder.weight
    ys = by_hand(w_enc.view(2, 2))
    target = ((ys[0] + ys[1]) / 2).detach()
    want_kd = 0.5 * sum(dist_loss(y, target, beta=2.0, gamma=2.0, tau=1.0) for y in ys)
    want_ce = 0.5 * sum(ce_loss(y, LABELS, 0.1) for y in ys)
    torch.testing.assert_close(losses["loss_kd"], want_kd, rtol=1e-4, atol=1e-6)  # DIST: 1 - r of r ~ 1
    torch.testing.assert_close(losses["loss_ce"], want_ce, rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad(losses["loss_kd"], w_enc)[0]
    want = torch.autograd.grad(want_kd, w_enc, retain_graph=True)[0]
    attached = 0.5 * sum(dist_loss(y, (ys[0] + ys[1]) / 2, beta=2.0, gamma=2.0, tau=1.0) for y in ys)
    wrong = torch.autograd.grad(attached, w_enc)[0]
    assert float((want - wrong).abs().max()) > 1e-3  # the check can tell detached from attached (~4e-3 apart)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("transfer", ["logits", "features"])
def test_every_schedule_and_transfer_trains_three_steps(schedule, transfer):
    """Finite and decreasing over 3 SGD steps on one batch (VP + features gave NaN at step 1: s'(1) = -inf)."""
    torch.manual_seed(0)
    student = DeployableModel(create_model("resnet8", num_classes=5, in_channels=1), (0.5,), (0.25,),
                              encoder="conv", schedule=schedule, transfer=transfer)
    teacher = DeployableModel(create_model("resnet14", num_classes=5, in_channels=1), (0.5,), (0.25,)).eval()
    cfg = MethodConfig(name="fmkt", loss="kd", schedule=schedule, transfer=transfer, train_steps="4")
    d = build_distiller(cfg, student, teacher, input_shape=(1, 8, 8)).train()
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 5, (16,))
    losses = []
    for _ in range(3):
        _, parts = d(x, y)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[2] < losses[0], losses
