"""Issue 23, model side: torchvision detectors by name, strict teacher weights, the FPN flow and its losses, and the
detection distiller (one student backbone pass; fmkt / pkd / none). Tiny sizes: 64-pixel images, 3 classes."""
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fmkt.detection.distiller import DetectionDistiller
from fmkt.detection.fpn_flow import FPNFlow, LevelFlow, attach_flow, default_level_weights
from fmkt.detection.models import create_detector, fpn_channels, fpn_features, freeze_batchnorm
from fmkt.errors import FmktError

SIZE = dict(min_size=64, max_size=64)
RCNN_LEVELS = ["0", "1", "2", "3", "pool"]


def small_rcnn(**extra):
    """A small box head (2x2 RoI pool): torchvision's 7x7 -> 1024 MLP is 12.8 M parameters, slow on 2 cores."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    return dict(SIZE, box_roi_pool=MultiScaleRoIAlign(RCNN_LEVELS[:4], 2, 2), box_head=TwoMLPHead(256 * 4, 1024),
                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64, **extra)


def batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * 30
        wh = 8 + torch.rand(2, 2, generator=g) * 24
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 3, (2,), generator=g)})
    return images, targets


# --- the flow on one level, by hand -----------------------------------------------------------------------------

class Halve(nn.Module):
    """An encoder whose output we control: v = u / 2."""

    def forward(self, u):
        return 0.5 * u


def pkd_by_hand(a, b):
    """PKD written out: per channel, standardise over (B, H, W) with the unbiased std + 1e-6, then MSE / 2."""
    total, count = 0.0, 0
    for c in range(a.shape[1]):
        xa, xb = a[:, c].flatten(), b[:, c].flatten()
        za = (xa - xa.mean()) / (xa.std() + 1e-6)
        zb = (xb - xb.mean()) / (xb.std() + 1e-6)
        total, count = total + ((za - zb) ** 2).sum(), count + xa.numel()
    return total / count / 2


def controlled_flow(channels=2, bias=(0.3, -0.2), project=False):
    torch.manual_seed(0)
    flow = FPNFlow(["0", "1"], channels, [3.0, 0.0], encoder=lambda c: Halve(), project_teacher=project).double()
    emb = flow.flows["0"].time_embed.mlp[2]  # e(t) = its bias, whatever t
    with torch.no_grad():
        emb.weight.zero_()
        emb.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return flow, torch.tensor(bias, dtype=torch.float64)[None, :, None, None]


@pytest.mark.parametrize("steps", [1, 2])
def test_level_loss_matches_a_hand_computation(steps):
    flow, e = controlled_flow()
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    z0 = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    student = OrderedDict([("0", z1), ("1", torch.randn(2, 2, 2, 2, dtype=torch.float64))])
    out = flow(student, {"0": z0, "1": torch.zeros(2, 2, 2, 2, dtype=torch.float64)}, steps=steps)
    x, losses = z1, []
    for _ in range(steps):  # rectified flow: target velocity Z1 - Z0 at every t; x <- x - v / N
        v = 0.5 * (x + e)
        losses.append(pkd_by_hand(v, z1 - z0))
        x = x - v / steps
    expected = sum(losses) / steps
    assert torch.allclose(out.per_level["0"], expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.total, 3.0 * expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.refined["0"], x, rtol=1e-10, atol=1e-12)
    assert torch.allclose(flow.eval().refine(student, steps)["0"], x, rtol=1e-10, atol=1e-12)  # inference: K steps
    assert set(out.per_level) == {"0"} and "1" not in flow.flows  # weight 0: no module, no term
    assert out.refined["1"] is student["1"]  # ... and the level passes through unchanged


def test_detach_target_keeps_the_loss_and_drops_the_targets_gradient():
    g = torch.Generator().manual_seed(4)
    z1_value, z0 = (torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    grads = {}
    for detach in (False, True):
        flow, e = controlled_flow()
        flow.detach_target = detach
        z1 = z1_value.clone().requires_grad_(True)
        out = flow({"0": z1, "1": z1[:, :, :2, :2]}, {"0": z0, "1": z0[:, :, :2, :2]}, steps=1)
        out.per_level["0"].backward()
        grads[detach] = z1.grad
        by_hand = z1_value.clone().requires_grad_(True)  # v = (z1 + e) / 2; the target z1 - z0 (a constant if detached)
        target = (z1_value if detach else by_hand) - z0
        expected = pkd_by_hand(0.5 * (by_hand + e), target)
        expected.backward()
        assert torch.allclose(out.per_level["0"].detach(), expected.detach(), rtol=1e-10)  # the same value
        assert torch.allclose(z1.grad, by_hand.grad, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(grads[False], grads[True], atol=1e-6)  # the target's gradient did reach Z1 before
    assert FPNFlow(["0"], 2, [1.0], encoder="dwconv").detach_target is False  # off by default: the authors' flow


def test_teacher_projection_enters_the_target():
    flow, e = controlled_flow(channels=2, project=True)
    level = flow.flows["0"]
    assert isinstance(level.teacher_projection[0], nn.BatchNorm2d) and level.teacher_projection[1].kernel_size == (1, 1)
    g = torch.Generator().manual_seed(2)
    z1, z0 = (torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    out = flow({"0": z1, "1": z1[:, :, :1, :1]}, {"0": z0, "1": z0[:, :, :1, :1]}, steps=1)
    target = z1 - level.teacher_projection(z0)
    assert torch.allclose(out.per_level["0"], pkd_by_hand(0.5 * (z1 + e), target), rtol=1e-10)


def test_every_level_enters_the_total_with_its_weight():
    torch.manual_seed(0)
    levels = ["0", "1", "2"]
    flow = FPNFlow(levels, 4, [6.0, 6.0, 6.0], encoder="dwconv", train_steps=2).double()
    g = torch.Generator().manual_seed(3)
    student = OrderedDict((k, torch.randn(2, 4, 8 >> i, 8 >> i, generator=g, dtype=torch.float64))
                          for i, k in enumerate(levels))
    teacher = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in student.items()}
    base = flow(student, teacher, steps=2)
    assert torch.allclose(base.total, sum(6.0 * v for v in base.per_level.values()), rtol=1e-12)
    for level in levels:
        flow.weights[level] = 9.5
        changed = flow(student, teacher, steps=2)
        flow.weights[level] = 6.0
        assert torch.allclose(changed.per_level[level], base.per_level[level], rtol=1e-12)
        assert torch.allclose(changed.total - base.total, 3.5 * base.per_level[level], rtol=1e-9, atol=1e-12)
    off = FPNFlow(levels, 4, [6.0, 0.0, 6.0], encoder="dwconv")
    assert list(off.flows) == ["0", "2"]
    with pytest.raises(FmktError, match="one weight per level"):
        FPNFlow(levels, 4, [6.0, 6.0])


def test_level_size_mismatch_is_one_sentence():
    flow = FPNFlow(["0"], 4, [1.0], encoder="dwconv")
    with pytest.raises(FmktError) as err:
        flow({"0": torch.randn(2, 4, 8, 8)}, {"0": torch.randn(2, 4, 4, 4)}, steps=1)
    assert "level '0'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FmktError, match="1x1 conv"):
        LevelFlow(4, 8, project_teacher=False)


# --- detectors ----------------------------------------------------------------------------------------------------

def test_fpn_levels_of_the_registered_detectors():
    expect = {"fasterrcnn_resnet18_fpn": RCNN_LEVELS, "retinanet_resnet18_fpn": ["0", "1", "2", "p6", "p7"],
              "fasterrcnn_mobilenet_v3_large_fpn": ["0", "1", "pool"]}
    weights = {}
    for name, levels in expect.items():
        det = create_detector(name, 3, **(small_rcnn() if name == "fasterrcnn_resnet18_fpn" else SIZE)).eval()
        _, _, feats = fpn_features(det, [torch.rand(3, 64, 64)])
        assert list(feats) == levels and fpn_channels(det) == 256, name
        weights[name] = default_level_weights(det, levels)
    assert weights["fasterrcnn_resnet18_fpn"] == (6.0, 6.0, 6.0, 6.0, 0.0)
    assert weights["retinanet_resnet18_fpn"] == (10.0, 10.0, 10.0, 10.0, 0.0)
    assert weights["fasterrcnn_mobilenet_v3_large_fpn"] == (6.0, 6.0, 0.0)


def test_unknown_detector_names_close_matches():
    with pytest.raises(FmktError, match="did you mean fasterrcnn_resnet18_fpn"):
        create_detector("fasterrcnn_resnet18_fpm", 3, **SIZE)


def test_import_path_factory(tmp_path, monkeypatch):
    (tmp_path / "mydets.py").write_text(
        "from fmkt.detection.models import create_detector\n"
        "def tiny(num_classes, min_size, max_size):\n"
        "    return create_detector('retinanet_resnet18_fpn', num_classes, min_size=min_size, max_size=max_size)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    det = create_detector("mydets:tiny", 4, **SIZE)
    assert det.head.classification_head.num_classes == 4 and det.transform.min_size == (64,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_teacher_weights_load_strictly_from_torchvision_key_names(tmp_path, suffix):
    torch.manual_seed(0)
    trained = create_detector("fasterrcnn_resnet18_fpn", 3, **small_rcnn())
    path = tmp_path / f"teacher{suffix}"
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    teacher = create_detector("fasterrcnn_resnet18_fpn", 3, weights=path, **small_rcnn()).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # frozen BN, as torchvision's teachers
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        got, want = fpn_features(teacher, x)[2], fpn_features(trained.eval(), x)[2]
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    frozen = tmp_path / "frozen.pth"  # torchvision's pretrained files: FrozenBatchNorm2d, no num_batches_tracked
    torch.save(freeze_batchnorm(trained).state_dict(), frozen)
    create_detector("fasterrcnn_resnet18_fpn", 3, weights=frozen, **small_rcnn())


def test_a_wrong_weights_file_is_one_sentence(tmp_path):
    other = tmp_path / "retina.pth"
    torch.save(create_detector("retinanet_resnet18_fpn", 3, **SIZE).state_dict(), other)
    with pytest.raises(FmktError) as err:
        create_detector("fasterrcnn_resnet18_fpn", 3, weights=other, **small_rcnn())
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg and "extra_blocks.p6" in msg and "\n" not in msg
    classes = tmp_path / "five.pth"
    torch.save(create_detector("fasterrcnn_resnet18_fpn", 5, **small_rcnn()).state_dict(), classes)
    with pytest.raises(FmktError, match="size mismatch for roi_heads.box_predictor"):
        create_detector("fasterrcnn_resnet18_fpn", 3, weights=classes, **small_rcnn())
    with pytest.raises(FmktError, match="does not exist"):
        create_detector("fasterrcnn_resnet18_fpn", 3, weights=tmp_path / "none.pth", **SIZE)


# --- the distiller ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return (create_detector("fasterrcnn_resnet18_fpn", 3, **small_rcnn()),
            create_detector("fasterrcnn_resnet18_fpn", 3, **small_rcnn()))


def test_fmkt_distiller_trains_with_one_backbone_pass(pair):
    student, teacher = pair
    flow = FPNFlow(RCNN_LEVELS, 256, default_level_weights(student, RCNN_LEVELS), encoder="dwconv", train_steps=2)
    dist = DetectionDistiller(student, teacher, flow, method="fmkt").train()
    calls = []
    handle = student.backbone.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD([p for p in dist.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images, targets = batch()
    for _ in range(3):
        loss, parts = dist.forward_train(images, targets)
        assert torch.isfinite(loss) and torch.allclose(loss, sum(parts.values()))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(flow.flows[k].encoder.net[1].weight.grad.abs().sum() > 0 for k in flow.flows)
        assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
        assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
        opt.step()
    handle.remove()
    assert len(calls) == 3  # one student backbone pass per step
    assert {f"loss_flow_{k}" for k in "0123"} | {"loss_classifier", "loss_box_reg", "loss_objectness",
                                                 "loss_rpn_box_reg"} == set(parts)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert teacher.training is False and student.training


def test_the_deployable_student_refines_its_fpn_maps(pair):
    student, _ = pair
    flow = FPNFlow(RCNN_LEVELS, 256, [6, 6, 6, 6, 0], encoder="dwconv").eval()
    deployed = attach_flow(student, flow, steps=2).eval()
    assert student.backbone is not deployed.backbone and deployed.backbone.raw is student.backbone
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        refined, raw = deployed.backbone(x), student.eval().backbone(x)
        expected = flow.refine(raw, 2)
        detections = deployed([x[0]])
    assert all(torch.allclose(refined[k], expected[k]) for k in raw) and torch.equal(refined["pool"], raw["pool"])
    assert not torch.allclose(refined["0"], raw["0"])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("refine", [True, False])
def test_the_heads_see_the_refined_maps_unless_told_not_to(pair, refine):
    """The authors' neck hands each level's end state to the heads: the detection losses reach the flow."""
    student, teacher = pair
    flow = FPNFlow(RCNN_LEVELS, 256, [6, 6, 6, 6, 0], encoder="dwconv", train_steps=1)
    dist = DetectionDistiller(student, teacher, flow, refine=refine).train()
    _, parts = dist.forward_train(*batch(seed=6))
    sum(v for k, v in parts.items() if not k.startswith("loss_flow")).backward()
    grads = [flow.flows[k].encoder.net[1].weight.grad for k in flow.flows]
    assert all(g is not None and g.abs().sum() > 0 for g in grads) if refine else all(g is None for g in grads)
    student.zero_grad(set_to_none=True)
    assert (dist.deployable() is student) is not refine


@pytest.mark.parametrize("method", ["pkd", "none"])
def test_baselines_losses_have_the_expected_keys(pair, method):
    student, teacher = pair
    dist = DetectionDistiller(student, teacher if method == "pkd" else None, method=method).train()
    loss, parts = dist.forward_train(*batch(seed=4))
    own = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    extra = {f"loss_pkd_{k}" for k in "0123"} if method == "pkd" else set()
    assert set(parts) == own | extra and torch.isfinite(loss) and torch.allclose(loss, sum(parts.values()))
    assert dist.deployable() is student


def test_retinanet_distiller_keys():
    torch.manual_seed(0)
    student, teacher = (create_detector("retinanet_resnet18_fpn", 3, **SIZE) for _ in range(2))
    levels = ["0", "1", "2", "p6", "p7"]
    flow = FPNFlow(levels, 256, default_level_weights(student, levels), encoder="dwconv", train_steps=1)
    loss, parts = DetectionDistiller(student, teacher, flow).train().forward_train(*batch(seed=5))
    assert set(parts) == {"loss_classification", "loss_bbox_regression"} | {f"loss_flow_{k}" for k in levels[:4]}
    assert torch.isfinite(loss)
    with pytest.raises(FmktError, match="zero or negative size"):
        DetectionDistiller(student, method="none").train().forward_train(
            [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([1])}])
