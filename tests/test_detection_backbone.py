"""detection.backbone_weights: the student's backbone body from an ImageNet classifier file, as torchvision's
``weights_backbone`` builds it (FrozenBatchNorm2d in the body, only the last n stages trainable, the classifier's head
ignored); mistakes are one sentence before any work; the artifact records it so a rebuild loads strictly, and eval,
export and resume work on it; without the key the run and the default teacher's cache key are what they were.

Tiny: seeded ResNet-18 classifier files, 64-pixel canvases, test_detection_run's tiny_rcnn (a ResNet-18-FPN)."""
import hashlib

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fmkt.detection.backbone import backbone_body, with_backbone_weights
from fmkt.detection.models import DETECTORS, create_detector
from fmkt.errors import FmktError
from test_detection_run import (DETECTOR, base, data, interrupt_at, invoke, meta, metrics,  # noqa: F401 (fixtures)
                                setting)

SIZE = dict(min_size=64, max_size=64)
EARLY, LATE = ("conv1.", "bn1.", "layer1."), ("layer2.", "layer3.", "layer4.")
#: teacher_cache_folder's key of a default detection config (student fasterrcnn_resnet18_fpn, teacher
#: fasterrcnn_resnet50_fpn), observed before detection.backbone_weights existed
DEFAULT_TEACHER_KEY = "detection-fasterrcnn_resnet50_fpn-313be05c8e45d89f"


def classifier_state(arch: str = "resnet18", seed: int = 3) -> dict:
    """A seeded torchvision classifier's state dict (its head included), BatchNorm statistics and affine moved off
    their initial 0 / 1 so that a load shows in them too."""
    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "bn1.weight", "bn1.bias")):
            state[key] = value + 0.1 + torch.rand(value.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: (path, state)}: resnet18 as .pth and .safetensors, a resnet50, and a resnet18 without layer4."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("backbone-files")
    r18, r50 = classifier_state(), classifier_state("resnet50")
    out = {"r18": (root / "resnet18.pth", r18), "r18s": (root / "resnet18.safetensors", r18),
           "r50": (root / "resnet50.pth", r50),
           "short": (root / "short.pth", {k: v for k, v in r18.items() if not k.startswith("layer4.")})}
    for name, (path, state) in out.items():
        save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return out


def body_matches(body: nn.Module, state: dict, prefixes=None) -> bool:
    """Every body key (under ``prefixes``, default all) equals the file's."""
    own = body.state_dict()
    keys = [k for k in own if prefixes is None or k.startswith(prefixes)]
    return bool(keys) and all(torch.equal(own[k], state[k]) for k in keys)


@pytest.mark.parametrize("trainable, suffix", [(3, "r18"), (5, "r18s"), (0, "r18")])
def test_the_body_takes_the_file_and_freezes_as_torchvision(files, trainable, suffix):
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    path, state = files[suffix]
    torch.manual_seed(0)
    detector = with_backbone_weights(create_detector("fasterrcnn_resnet18_fpn", 3, **SIZE), path, trainable)
    body = backbone_body(detector)
    assert set(body.state_dict()) == {k for k in state if not k.startswith("fc.") and "num_batches" not in k}
    assert body_matches(body, state)  # fc ignored, every other key loaded
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(type(m) is FrozenBatchNorm2d for m in norms)
    trains = {n for n, p in body.named_parameters() if p.requires_grad}
    reference = _resnet_fpn_extractor(resnet18(norm_layer=FrozenBatchNorm2d), trainable).body
    assert trains == {n for n, p in reference.named_parameters() if p.requires_grad}  # torchvision's own rule
    if trainable == 3:
        assert trains == {n for n, _ in body.named_parameters() if n.startswith(LATE)}
    assert (trains == {n for n, _ in body.named_parameters()}) == (trainable == 5)
    assert all(p.requires_grad for n, p in detector.named_parameters() if not n.startswith("backbone.body."))


def test_a_mobilenet_body_takes_features_and_freezes_as_torchvision(tmp_path):
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor

    torch.manual_seed(4)
    state = mobilenet_v3_large(weights=None).state_dict()
    torch.save(state, tmp_path / "mobilenet.pth")
    detector = create_detector("fasterrcnn_mobilenet_v3_large_fpn", 3, **SIZE)
    with_backbone_weights(detector, tmp_path / "mobilenet.pth", 3)
    body = backbone_body(detector)
    assert all(torch.equal(v, state["features." + k]) for k, v in body.state_dict().items())  # classifier.* ignored
    reference = _mobilenet_extractor(mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, 3).body
    assert {n for n, p in body.named_parameters() if p.requires_grad} == \
        {n for n, p in reference.named_parameters() if p.requires_grad}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())


def test_files_that_do_not_fit_are_one_sentence(files, tmp_path):
    def refused(path, trainable=3, name="fasterrcnn_resnet18_fpn"):
        with pytest.raises(FmktError) as err:
            with_backbone_weights(create_detector(name, 3, **SIZE), path, trainable)
        text = str(err.value)
        assert "\n" not in text and text.count(". ") <= 1, text
        return text

    text = refused(files["r50"][0])
    assert "ResNet-18" in text and "seems to be a ResNet-50" in text and "unexpected" in text, text
    text = refused(files["short"][0])
    assert "missing" in text and "layer4." in text, text
    torch.save({f"backbone.body.{k}": v for k, v in files["r18"][1].items()}, tmp_path / "detector.pth")
    assert "whole detector's state dict" in refused(tmp_path / "detector.pth")
    wide = dict(files["r18"][1], **{"conv1.weight": torch.zeros(32, 3, 7, 7)})
    torch.save(wide, tmp_path / "wide.pth")
    text = refused(tmp_path / "wide.pth")
    assert "other shapes, first conv1.weight ((32, 3, 7, 7) in the file, (64, 3, 7, 7) in the body)" in text, text
    assert "does not exist" in refused(tmp_path / "nowhere.pth")
    assert "from 0 to 5" in refused(files["r18"][0], trainable=6)


class Bodyless(nn.Module):
    """A backbone with the FPN's out_channels but no .body."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.out_channels = inner, inner.out_channels

    def forward(self, x):
        return self.inner(x)


def bodyless(num_classes, min_size, max_size, **kwargs):
    detector = DETECTORS["fasterrcnn_resnet18_fpn"](num_classes, min_size=min_size, max_size=max_size, **kwargs)
    detector.backbone = Bodyless(detector.backbone)
    return detector


@pytest.mark.parametrize("student, more, match", [
    ("test_detection_backbone:bodyless", {}, "backbone has no .body"),
    (DETECTOR, {"trainable_backbone_layers": -1}, "from 0 to 5"),
    (DETECTOR, {"backbone_weights": None, "trainable_backbone_layers": 5}, "applies only with"),
    ("fasterrcnn_resnet50_fpn", {}, "seems to be a ResNet-18"),
])
def test_the_checks_refuse_before_any_work(files, student, more, match, tmp_path):
    from fmkt.commands import configure

    detection = {"backbone_weights": str(files["r18"][0]), **more}
    with pytest.raises(FmktError, match=match) as err:
        configure(None, [{"task": "detection", "student": student, "method": {"name": "none"},
                          "detection": detection}])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("student", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_the_coco_recipes_students_take_a_resnet50_classifier(files, student):
    from fmkt.commands import configure

    cfg = configure(None, [{"task": "detection", "student": student, "method": {"name": "none"},
                            "detection": {"backbone_weights": str(files["r50"][0])}}])
    assert cfg.detection.trainable_backbone_layers == 3


def test_the_cli_refuses_a_file_of_another_depth(data, files, tmp_path):
    result = invoke(base(data[0], "--method", "none", "--set", f"detection.backbone_weights={files['r50'][0]}",
                         epochs=1), tmp_path / "o")
    assert result.exit_code == 2 and "seems to be a ResNet-50" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def args_with_file(root, path):
    """1 epoch of method none, 2 steps of 8 canvases, a checkpoint after each; every detection kept (for export)."""
    return base(root, "--method", "none", "--set", f"detection.backbone_weights={path}", "--set",
                "detection.trainable_backbone_layers=3", "--set", "train.checkpoint_every_steps=1", "--set",
                "student_kwargs={box_score_thresh: 0.0, box_detections_per_img: 10}", "--batch-size", 8, epochs=1)


@pytest.fixture(scope="module")
def trained(data, files, tmp_path_factory):
    """(out folder, the deployable student the run handed to the artifact's writer)."""
    import fmkt.detection.run as run

    out, seen, threads = tmp_path_factory.mktemp("with-file") / "run", {}, torch.get_num_threads()
    real = run.save_detector_artifact

    def keep(path, model, spec, record):
        seen["model"] = model
        return real(path, model, spec, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "save_detector_artifact", keep)
        mp.setenv("FMKT_CACHE", str(out.parent / "cache"))
        result = invoke(args_with_file(data[0], files["r18"][0]), out)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, seen["model"]


def test_the_artifact_records_the_file_and_rebuilds_the_trained_student(trained, files):
    from fmkt.detection.artifact import load_detector_artifact
    from fmkt.detection.models import fpn_features

    out, model = trained
    path, state = files["r18"]
    m = meta(out)
    assert (m["model"]["frozen_backbone_bn"], m["model"]["trainable_backbone_layers"]) == (True, 3)
    assert m["backbone_weights"] == {"name": "resnet18.pth", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                     "trainable_layers": 3}
    loaded, _ = load_detector_artifact(out / "artifact")  # strictly, from the spec alone
    body = backbone_body(loaded)
    assert all(type(x) is FrozenBatchNorm2d for x in body.modules() if "BatchNorm" in type(x).__name__)
    assert body_matches(body, state, EARLY)  # the frozen stages did not train
    norms = [k for k in body.state_dict() if "bn" in k or "downsample.1" in k]
    assert norms and all(torch.equal(body.state_dict()[k], state[k]) for k in norms)  # nor any frozen BatchNorm
    assert not torch.equal(body.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    model.eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want, got = model(images), loaded(images)
        feats = fpn_features(model, images)[2], fpn_features(loaded, images)[2]
    assert all(torch.equal(feats[0][k], feats[1][k]) for k in feats[0])
    assert all(len(w["boxes"]) > 0 for w in want)
    assert all(torch.equal(w[k], g[k]) for w, g in zip(want, got) for k in ("boxes", "scores", "labels"))


def test_a_spec_with_half_the_backbone_keys_is_one_sentence():
    from fmkt.detection.artifact import check_spec, detector_spec

    spec = detector_spec("fasterrcnn_resnet18_fpn", 3, **SIZE, trainable_backbone_layers=2)
    assert (spec["frozen_backbone_bn"], spec["trainable_backbone_layers"]) == (True, 2)
    for bad in ({"frozen_backbone_bn": True}, {"trainable_backbone_layers": 2}, {"frozen_backbone_bn": False}):
        half = {k: v for k, v in spec.items() if k not in ("frozen_backbone_bn", "trainable_backbone_layers")}
        with pytest.raises(FmktError, match="a student from scratch neither"):
            check_spec({**half, **bad})


def test_eval_and_export_work_on_it(trained, tmp_path):
    import json

    pytest.importorskip("onnxruntime")
    out, _ = trained
    scored = invoke(["eval", out / "artifact", "--batch-size", 6, "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["map"]["plain"] == pytest.approx(meta(out)["metrics"]["last"], abs=1e-9)
    exported = invoke(["export", out / "artifact", "--out", tmp_path / "onnx"])
    assert exported.exit_code == 0, exported.output
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["passed"] is True and parity["reports"][0]["totals"]["matched"] > 0


def test_resume_equals_uninterrupted(trained, data, files, tmp_path, monkeypatch):
    full, _ = trained
    args = args_with_file(data[0], files["r18"][0])
    restore = interrupt_at(monkeypatch, 2)
    broken = invoke(args, tmp_path / "r")
    restore()
    assert broken.exit_code == 130, broken.output
    resumed = invoke([*args, "--resume"], tmp_path / "r")
    assert resumed.exit_code == 0, resumed.output
    assert metrics(tmp_path / "r", timing=False) == metrics(full, timing=False)
    assert meta(tmp_path / "r")["weights_sha256"] == meta(full)["weights_sha256"]


def test_without_the_key_the_student_and_the_teacher_key_are_as_before(files):
    from fmkt.commands import configure
    from fmkt.detection.artifact import SPEC_KEYS
    from fmkt.detection.command import teacher_cache_folder
    from fmkt.detection.run import build_models
    from fmkt.runtime import seed_everything

    plain = {"task": "detection", "student": "fasterrcnn_resnet18_fpn",
             "teacher": {"arch": "fasterrcnn_resnet50_fpn"}, "method": {"name": "none"}, "detection": SIZE}
    cfg = configure(None, [plain])
    model, spec = build_models(cfg, 3, None, torch.device("cpu"))
    assert sorted(spec) == sorted([*SPEC_KEYS, "options"])  # no backbone keys: the spec of every older artifact
    student = model.distiller.student
    assert all(p.requires_grad for p in student.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in student.modules())
    seed_everything(cfg.train.seed)
    fresh = create_detector("fasterrcnn_resnet18_fpn", 4, **SIZE)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in student.state_dict().items())  # as before

    fmkt_default = {k: v for k, v in plain.items() if k not in ("method", "detection")}
    assert teacher_cache_folder(configure(None, [fmkt_default]))[1].name == DEFAULT_TEACHER_KEY
    with_file = dict(fmkt_default, detection={"backbone_weights": str(files["r18"][0]),
                                              "trainable_backbone_layers": 5})
    t, folder = teacher_cache_folder(configure(None, [with_file]))
    assert folder.name == DEFAULT_TEACHER_KEY and t.detection.backbone_weights is None  # the student's file only
