"""timm models as students and teachers: Z1, the model's own head as S, every flow method, weights, refusals.

Tiny timm models on (1, 32, 32) images: deit_tiny with patch 4 (an 8 x 8 grid), convnext_atto (LayerNorm head:
not linear), mobilenetv3_small_050 (conv_head: not linear).
"""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from fmkt.config import Config, MethodConfig, apply_overrides  # noqa: E402
from fmkt.distillers import METHODS, build_distiller  # noqa: E402
from fmkt.errors import FmktError  # noqa: E402
from fmkt.flow.encoders import ENCODERS  # noqa: E402
from fmkt.student import StudentSpec, build_student, ensemble_logits  # noqa: E402
from fmkt.teacher import load_teacher  # noqa: E402

VIT = ("timm:deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2})
CONVNEXT = ("timm:convnext_atto", {})
MOBILENET = ("timm:mobilenetv3_small_050", {})
STUDENTS = {"vit": VIT, "convnext": CONVNEXT, "mobilenetv3": MOBILENET}
FLOW_METHODS = [m for m, spec in METHODS.items() if spec.flow]


def spec_for(arch, kwargs, *, encoder="conv", theta=False, adapter=None, transfer="logits"):
    return StudentSpec(arch=arch, num_classes=10, channels=1, size=(32, 32), mean=(0.5,), std=(0.25,),
                       arch_kwargs=dict(kwargs), encoder=encoder, theta_head=theta, adapter=adapter,
                       transfer=transfer, default_steps=2)


def plain(arch, kwargs, seed=0):
    torch.manual_seed(seed)
    return build_student(dataclasses.replace(spec_for(arch, kwargs), encoder=None)).eval().requires_grad_(False)


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def three_steps(distiller, lr=1e-3):
    """Three AdamW steps on one fixed batch; the losses before each step."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    images, labels = batch()
    losses = []
    for _ in range(3):
        _, parts = distiller.forward_train(images, labels, 0.5)
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------------------------- Z1 and S
def test_vit_z1_is_the_class_token_expanded_to_7x7_as_the_official_code():
    torch.manual_seed(0)
    model = build_student(spec_for(*VIT)).eval()
    x, _ = batch()
    tokens = model.backbone.module.forward_features(model.normalize(x))
    z1 = model.features(x)
    assert z1.shape == (8, 192, 7, 7)
    assert torch.equal(z1, tokens[:, 0, :, None, None].expand(-1, -1, 7, 7))
    assert model.pooled_head  # deit: token pool -> Identity fc_norm -> Linear


def test_vit_patch_grid_is_an_option_with_the_patch_tokens_in_raster_order():
    torch.manual_seed(0)
    model = build_student(spec_for(*VIT, adapter={"z1": "patches"})).eval()
    x, _ = batch()
    tokens = model.backbone.module.forward_features(model.normalize(x))
    z1 = model.features(x)
    assert z1.shape == (8, 192, 8, 8)
    assert torch.equal(z1[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])
    assert model.backbone.options["z1"] == "patches"


@pytest.mark.parametrize("name", ["convnext", "mobilenetv3"])
def test_non_linear_heads_are_found_and_s_is_the_models_own_head(name):
    arch, kwargs = STUDENTS[name]
    torch.manual_seed(0)
    model = build_student(spec_for(arch, kwargs)).eval()
    assert not model.pooled_head
    x, _ = batch()
    with torch.no_grad():
        z1 = model.features(x)
        assert torch.allclose(model.map_head(z1), model.backbone.module(model.normalize(x)), atol=1e-5)


def test_the_ensemble_is_the_mean_of_the_steps_logits_through_the_own_head():
    torch.manual_seed(0)
    model = build_student(spec_for(*CONVNEXT)).eval()
    x, _ = batch()
    with torch.no_grad():
        z1 = model.features(x)
        out = model.sample(z1, 3)
        by_hand = [model.backbone.module.forward_head(e) for e in out.estimates]
        assert len(out.estimates) == 3
        assert torch.allclose(model(x, 3), torch.stack(by_hand).mean(0), atol=1e-6)
        # and not S of the mean estimate: the head is not linear, so the two differ
        assert not torch.allclose(model(x, 3), model.backbone.module.forward_head(torch.stack(out.estimates).mean(0)),
                                  atol=1e-4)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_the_exact_ensemble_equals_the_pooled_shortcut_where_the_head_is_linear(name):
    arch, kwargs = VIT if name == "vit" else ("timm:resnet10t", {})
    torch.manual_seed(0)
    model = build_student(spec_for(arch, kwargs, encoder="conv")).eval()
    assert model.pooled_head
    x, _ = batch()
    with torch.no_grad():
        z1 = model.features(x)
        for k in (1, 2, 4):
            shortcut = model(x, k)
            out = model.sample(z1, k)
            model.pooled_head = False  # the exact path: the own head on every estimate map, logits averaged
            exact = model(x, k)
            exact_steps = model.step_logits(model.sample(z1, k))
            model.pooled_head = True
            assert torch.allclose(exact, shortcut, atol=1e-5, rtol=1e-5), k
            for a, b in zip(exact_steps, model.step_logits(out)):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", sorted(STUDENTS))
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_every_flow_method_trains_each_timm_student_with_a_decreasing_loss(method, name):
    arch, kwargs = STUDENTS[name]
    torch.manual_seed(0)
    student = build_student(spec_for(arch, kwargs, theta=METHODS[method].theta)).train()
    teacher = plain("wrn_16_2", {}) if METHODS[method].needs_teacher else None
    cfg = MethodConfig(name=method, train_steps="2", ce_weight=1.0)
    losses = three_steps(build_distiller(cfg, student, teacher, input_shape=(1, 32, 32)))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[2] < losses[0], losses


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_encoder_trains_a_vit_student(encoder):
    torch.manual_seed(0)
    student = build_student(spec_for(*VIT, encoder=encoder)).train()
    cfg = MethodConfig(name="fmkt", train_steps="2")
    losses = three_steps(build_distiller(cfg, student, plain("wrn_16_2", {}), input_shape=(1, 32, 32)))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0], losses


def test_feature_transfer_trains_a_vit_student_from_a_cnn_teacher():
    torch.manual_seed(0)
    student = build_student(spec_for(*VIT, transfer="features")).train()
    cfg = MethodConfig(name="fmkt", train_steps="2", transfer="features")
    losses = three_steps(build_distiller(cfg, student, plain("wrn_16_2", {}), input_shape=(1, 32, 32)))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0], losses


def test_a_vit_teacher_distils_into_a_cnn_student():
    torch.manual_seed(0)
    teacher = plain(*VIT)
    student = build_student(dataclasses.replace(spec_for("resnet8", {}), arch="resnet8")).train()
    losses = three_steps(build_distiller(MethodConfig(name="fmkt", train_steps="2"), student, teacher,
                                         input_shape=(1, 32, 32)), lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[2] < losses[0], losses


# ----------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_key_names_load_strictly_as_a_teacher(tmp_path, suffix):
    torch.manual_seed(3)
    source = timm.create_model("deit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, patch_size=4,
                               depth=2).eval()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"deit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 3}, path)
    teacher, record = load_teacher(path, arch=VIT[0], arch_kwargs=VIT[1], num_classes=10, in_channels=1,
                                   mean=(0.0,), std=(1.0,), input_size=(32, 32))
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(teacher(x), source(x))
    assert record["arch"] == VIT[0]
    state.pop("head.bias")
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FmktError, match="do not fit"):
        load_teacher(tmp_path / "missing.safetensors", arch=VIT[0], arch_kwargs=VIT[1], num_classes=10,
                     in_channels=1, mean=(0.0,), std=(1.0,), input_size=(32, 32))


def test_a_timm_student_artifact_reloads_to_the_same_outputs(tmp_path):
    from fmkt.artifact import load_artifact, save_artifact
    from fmkt.student import spec_of

    torch.manual_seed(0)
    model = build_student(spec_for(*MOBILENET, theta=True)).eval()
    save_artifact(tmp_path / "a", model, spec_of(model).to_json(), {"method": "theta", "metrics": {}})
    again, meta = load_artifact(tmp_path / "a")
    assert meta["model"]["arch"] == MOBILENET[0]
    x, _ = batch()
    with torch.no_grad():
        for k in (0, 1, 3):
            assert torch.equal(model(x, k), again(x, k)), k


# ----------------------------------------------------------------------------------------------- refusals, config
def test_a_distilled_deit_student_is_refused_in_one_sentence_but_teaches():
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2}
    with pytest.raises(FmktError, match="distilled DeiT") as err:
        build_student(spec_for("timm:deit_tiny_distilled_patch16_224", kwargs))
    assert "\n" not in str(err.value)
    teacher = plain("timm:deit_tiny_distilled_patch16_224", kwargs)
    assert teacher(batch()[0]).shape == (8, 10)


def test_unknown_timm_names_and_options_are_refused_with_a_hint():
    with pytest.raises(FmktError, match="did you mean timm:deit_tiny_patch16_224"):
        build_student(spec_for("timm:deit_tiny_patch16_22", {}))
    with pytest.raises(FmktError, match="z1 chooses a Vision Transformer"):
        build_student(spec_for(*CONVNEXT, adapter={"z1": "cls"}))
    with pytest.raises(FmktError, match="img_size"):
        build_student(spec_for("timm:deit_tiny_patch16_224", {"depth": 1}))  # 224 pos-embed on 32 x 32 images


def test_pretrained_without_the_hub_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-fmkt-test")
    with pytest.raises(FmktError, match="pretrained=true needs the Hugging Face hub") as err:
        build_student(spec_for("timm:convnext_atto", {"pretrained": True}))
    assert "\n" not in str(err.value)


def test_student_and_teacher_kwargs_come_through_the_config():
    cfg = apply_overrides(Config(), {"student": VIT[0], "student_kwargs": {"img_size": 32, "patch_size": 4},
                                     "student_options": {"z1": "patches"},
                                     "teacher": {"arch": "timm:convnext_atto", "kwargs": {"drop_rate": 0.1}}})
    from fmkt.commands import teacher_cache_key, teacher_config

    t = teacher_config(cfg)
    assert (t.student, t.student_kwargs) == ("timm:convnext_atto", {"drop_rate": 0.1})
    other = teacher_config(apply_overrides(cfg, {"teacher": {"kwargs": {"drop_rate": 0.2}}}))
    assert teacher_cache_key(t) != teacher_cache_key(other)
    from fmkt.engine import student_spec
    from fmkt.data import dataset_info

    spec = student_spec(cfg, dataset_info("digits"))
    assert spec.arch_kwargs == {"img_size": 32, "patch_size": 4} and spec.adapter == {"z1": "patches"}


def test_ensemble_logits_is_what_the_model_returns():
    torch.manual_seed(0)
    model = build_student(spec_for(*MOBILENET)).eval()
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x, 2), ensemble_logits(model, model.sample(model.features(x), 2)))


def test_the_python_api_takes_a_timm_student_and_saves_what_rebuilds_it(tmp_path):
    import fmkt
    from fmkt.artifact import load_artifact

    torch.manual_seed(0)
    student = fmkt.create_model("timm:convnext_atto", num_classes=10, in_channels=1, input_size=(32, 32))
    teacher = fmkt.create_model("resnet8", num_classes=10, in_channels=1)
    x, y = batch()
    fm = fmkt.FMKT(student, teacher, example=x, train_steps=2)
    assert fm.arch == "timm:convnext_atto" and not fm.model.pooled_head
    assert torch.isfinite(fm.loss(x, y))
    fm.save(tmp_path / "a")
    again, meta = load_artifact(tmp_path / "a")
    fm.model.eval()
    with torch.no_grad():
        assert torch.equal(again(x, 2), fm.model(x, 2))
    assert meta["model"]["arch"] == "timm:convnext_atto"


def test_data_image_size_resizes_in_memory_data_with_torchvision():
    from torchvision.transforms.v2 import functional as TF

    from fmkt.data import dataset_info, load_dataset

    train, test, info = load_dataset("digits", image_size=16)
    own, _, own_info = load_dataset("digits")
    assert info.image_size == (16, 16) and dataset_info("digits", image_size=16).image_size == (16, 16)
    assert train.images.shape[1:] == (1, 16, 16) and test.images.shape[1:] == (1, 16, 16)
    expected = TF.resize(own.images, [16, 16], antialias=True).clamp(0, 1)
    assert torch.equal(train.images, expected)
    assert info.crop_padding == 2 * own_info.crop_padding  # the random crop's padding scales with the image
    same, _, _ = load_dataset("digits", image_size=8)
    assert torch.equal(same.images, own.images)


def test_pretrained_is_never_recorded_for_the_rebuild():
    from fmkt.student import spec_of

    backbone = build_student(spec_for(*CONVNEXT)).backbone
    spec = spec_for(CONVNEXT[0], {"pretrained": True, "drop_rate": 0.0})
    model = build_student(spec, backbone=backbone)  # the weights came from the hub once; a rebuild loads saved ones
    assert spec_of(model).arch_kwargs == {"drop_rate": 0.0}
