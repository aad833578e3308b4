"""The paper's ViT row (DeiT3-Small -> DeiT-Tiny) and DeiT's augmentation from timm.

- PUBLISHED_DEIT against the authors' files, read again here (their Python configs parsed, never run) and by hand;
  the recipes load and pass every check;
- soft targets: each method's losses with a one-hot soft target equal those with the hard label; DKD takes the
  soft target's argmax;
- Mixup/CutMix (fmkt.mixing): timm's, reproducible from (seed, epoch, step, rank), the global generators untouched;
  a tiny run with both on trains (the resume test is tests/test_resume_randomness.py's "mixup and cutmix");
- per-image augmentation (fmkt.data.deit_aug): timm's RandAugment and RandomErasing, seeded by the generator
  alone; repeated augmentation as timm's RepeatAugSampler; refused where nothing applies it;
- every key off: the code paths of a default run are untouched and a run with the keys set to off is bit-identical.
"""
import ast
import json
import math
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fmkt.cli.app import app
from fmkt.commands import _LATER_DATA_KEYS, check_method_names, configure
from fmkt.config import Config, DataConfig, apply_overrides, build_config, recipe_names
from fmkt.data.deit_aug import (ImageAugment, build_image_augment, check_augmentation, image_generator,
                                repeated_indices, repeated_length, seeded_global_rngs)
from fmkt.distillers import METHODS, build_distiller
from fmkt.distillers.published_deit import DEIT_PAIRS, FMKT_DEIT, PUBLISHED_DEIT
from fmkt.errors import FmktError
from fmkt.losses import ce_loss, dkd_loss, hard_target
from fmkt.mixing import BatchMixer, MixingStep, with_mixing
from fmkt.models import create_model
from fmkt.student import StudentSpec, build_student

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/shaoshitong+FM-KT-DeiT/repo")
DEIT_RECIPES = [n for n in recipe_names() if n.startswith("imagenet_deit3_small_deit_tiny")]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the registry
# Transcribed by hand from the authors' files (PUBLISHED_DEIT's sources).
WANT = {
    "fmkt": dict(loss="dist", loss_params={"beta": 2.0, "gamma": 2.0, "tau": 1.0}, ce_weight=1.0, loss_weight=1.0,
                 encoder="mlp", encoder_params={"depth": 2, "expansion": 1}, train_steps="8", schedule="rectified",
                 dirac_ratio=1.0),
    "kd": dict(loss_params={"temperature": 1.0}, ce_weight=0.5, loss_weight=0.5),
    "dkd": dict(loss_params={"alpha": 1.0, "beta": 0.5, "temperature": 1.0}, ce_weight=1.0, loss_weight=1.0,
                dkd_warmup_epochs=0.0),
    "dist": dict(loss_params={"beta": 1.0, "gamma": 1.0, "tau": 1.0}, ce_weight=1.0, loss_weight=2.0),
}


@pytest.mark.parametrize("key", list(PUBLISHED_DEIT))
def test_deit_settings_are_the_authors(key):
    assert set(PUBLISHED_DEIT) == set(WANT) and len(DEIT_PAIRS) == 1
    teacher, student = DEIT_PAIRS[0]
    cfg = apply_overrides(Config(), PUBLISHED_DEIT[key].overrides(teacher, student))
    check_method_names(cfg.method)
    assert cfg.method.name == key and cfg.method.label_smoothing == 0.1
    assert {k: getattr(cfg.method, k) for k in WANT[key]} == WANT[key]
    assert (cfg.student, cfg.teacher.arch) == ("timm:deit_tiny_patch16_224",
                                               "timm:deit3_small_patch16_224.fb_in22k_ft_in1k")
    assert (cfg.data.batch_size, cfg.train.epochs) == (1024, 300)
    assert (cfg.data.augment_policy, cfg.data.reprob, cfg.data.mixup, cfg.data.cutmix, cfg.data.repeated_aug) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0)
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.scheduler, o.warmup_epochs) == ("adamw", 1e-3, 0.05, "cosine", 20.0)
    assert FMKT_DEIT in PUBLISHED_DEIT[key].source or key == "dist"
    assert "our choice" in PUBLISHED_DEIT["dist"].note and "ViTKD" in PUBLISHED_DEIT["fmkt"].note


def _calls(path: str) -> dict:
    """{type: keyword constants} of every dict(type=..., ...) call in one of the authors' Python configs, and
    {"_assign": {name: value}} of its constant top-level assignments: parsed, never executed."""
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{FMKT_DEIT.split('@')[1]}:{path}"],
                          capture_output=True, text=True, check=True).stdout
    tree, out = ast.parse(text), {"_assign": {}}

    def value(node):
        if isinstance(node, ast.BinOp):  # 5e-4 * 1024 / 512
            ops = {ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
            return ops[type(node.op)](value(node.left), value(node.right))
        return ast.literal_eval(node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if "type" in kw and isinstance(kw["type"], ast.Constant):
                found = {}
                for name, v in kw.items():
                    try:
                        found[name] = value(v)
                    except (ValueError, KeyError, TypeError, SyntaxError):
                        pass
                out.setdefault(kw["type"].value, []).append(found)
            for name, v in kw.items():
                try:
                    out["_assign"].setdefault(name, value(v))
                except (ValueError, KeyError, TypeError, SyntaxError):
                    pass
    return out


@pytest.mark.skipif(not MIRROR.is_dir(), reason="the FM-KT-DeiT repository is not mirrored here")
def test_deit_settings_match_the_mirrored_configs():
    """The numbers read from the authors' configs at the cited commit: the distillation config's KD, DKD and
    FlowLoss blocks, the DeiT-Tiny base (label smoothing, Mixup/CutMix, batch per GPU), the schedule and the
    pipeline; and every path cited from that repository exists there."""
    teacher, student = DEIT_PAIRS[0]
    m = {k: apply_overrides(Config(), PUBLISHED_DEIT[k].overrides(teacher, student)) for k in PUBLISHED_DEIT}
    distill = _calls("configs/distillers/imagenet/deit-s3_distill_deit-t_img.py")
    kd, dkd, flow = distill["KDLoss"][0], distill["DKDLoss"][0], distill["FlowLoss"][0]
    assert (m["kd"].method.loss_params["temperature"], m["kd"].method.loss_weight) == (kd["temp"], kd["alpha"])
    assert m["kd"].method.ce_weight == 1 - kd["alpha"]
    assert m["dkd"].method.loss_params == {"alpha": dkd["alpha"], "beta": dkd["beta"], "temperature": dkd["temp"]}
    assert (flow["flow_loss_type"], flow["encoder_type"], flow["loss_type"]) == ("dist", "mlp", "logit_based")
    assert m["fmkt"].method.encoder_params["depth"] == flow["number"]
    assert flow["inference_sampling"] in m["fmkt"].method.eval_steps
    base = _calls("configs/deit/deit-small_pt-4xb256_in1k.py")
    assert base["LabelSmoothLoss"][0]["label_smooth_val"] == m["fmkt"].method.label_smoothing
    assert (base["Mixup"][0]["alpha"], base["CutMix"][0]["alpha"]) == (m["fmkt"].data.mixup, m["fmkt"].data.cutmix)
    assert base["_assign"]["batch_size"] * 4 == m["fmkt"].data.batch_size  # 4xb256
    sched = _calls("configs/_base_/schedules/imagenet_bs1024_adamw_swin.py")
    adamw = sched["AdamW"][0]
    assert (adamw["lr"], adamw["weight_decay"]) == (m["fmkt"].optim.lr, m["fmkt"].optim.weight_decay)
    assert sched["LinearLR"][0]["end"] == m["fmkt"].optim.warmup_epochs
    assert sched["_assign"]["max_epochs"] == m["fmkt"].train.epochs
    pipe = _calls("configs/_base_/datasets/imagenet_bs64_swin_224.py")
    ra, er = pipe["RandAugment"][0], pipe["RandomErasing"][0]
    assert f"rand-m{ra['magnitude_level']}-mstd{ra['magnitude_std']}-inc1" == m["fmkt"].data.augment_policy
    assert ra["num_policies"] == 2 and ra["policies"] == "timm_increasing"  # timm's n=2 default, its 'inc1' ops
    assert (er["erase_prob"], er["mode"]) == (m["fmkt"].data.reprob, "rand")
    assert pipe["DefaultSampler"] and m["fmkt"].data.repeated_aug == 0  # no RepeatAugSampler
    commit = FMKT_DEIT.split("@")[1]
    cited = {p for s in PUBLISHED_DEIT.values() for p in re.findall(r"(?:configs|mmcls)/[\w/.-]+\.py", s.source)}
    for path in cited | {"vitkd.md", "mmcls/models/dis_losses/vitkd.py"}:
        assert subprocess.run(["git", "-C", str(MIRROR), "cat-file", "-e", f"{commit}:{path}"]).returncode == 0, path


def _tiny_vit_overrides(tmp_path) -> list:
    from imagefolder_data import make_image_folder

    folder = make_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=1)
    vit = {"img_size": 32, "patch_size": 4}
    return [{"data": {"dir": str(folder), "image_size": 32}, "student_kwargs": vit,
             "teacher": {"kwargs": vit}}]


@pytest.mark.parametrize("name", DEIT_RECIPES)
def test_deit_recipes_load_and_validate(name, tmp_path, monkeypatch):
    """Every name against its registry, the timm student and teacher built and dry-run (at 32 x 32 here)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert len(DEIT_RECIPES) == 4
    cfg = configure(name, _tiny_vit_overrides(tmp_path))
    assert (cfg.teacher.arch, cfg.student) == DEIT_PAIRS[0]
    assert (cfg.data.name, cfg.data.mixup, cfg.data.cutmix, cfg.method.label_smoothing) == \
        ("imagefolder", 0.8, 1.0, 0.1)
    recipe = build_config(name)  # as shipped: 224 x 224, the per-image keys on
    assert (recipe.data.image_size, recipe.data.augment_policy, recipe.data.reprob) == \
        (224, "rand-m9-mstd0.5-inc1", 0.25)


def test_per_image_keys_are_checked():
    for data, what in [(DataConfig(name="digits", reprob=0.25), "image folders"),
                       (DataConfig(name="imagefolder", augment=False, repeated_aug=3), "data.augment is false"),
                       (DataConfig(name="imagefolder", augment_policy="rand-q9"), "not a timm auto-augment")]:
        with pytest.raises(FmktError, match=what):
            check_augmentation(data)
    check_augmentation(DataConfig(name="digits", mixup=0.8, cutmix=1.0))  # batch mixing works everywhere
    for bad, what in [({"reprob": 1.5}, "in \\[0, 1\\]"), ({"mixup": -1}, ">= 0"),
                      ({"mixup": 0.8, "batch_size": 7}, "even")]:
        with pytest.raises(FmktError, match=what):
            build_config(None, [{"data": bad}])


# ------------------------------------------------------------------------------------------ soft targets
MEAN, STD = (0.5,), (0.25,)


def _distiller(method: str, loss: str, smoothing: float):
    m = METHODS[method]
    torch.manual_seed(0)
    student = build_student(StudentSpec(arch="resnet8", num_classes=5, channels=1, size=(8, 8), mean=MEAN, std=STD,
                                        encoder="conv" if m.flow else None, theta_head=m.theta, default_steps=2))
    teacher = build_student(StudentSpec(arch="resnet8", num_classes=5, channels=1, size=(8, 8), mean=MEAN,
                                        std=STD)).eval() if m.needs_teacher else None
    from fmkt.config import MethodConfig

    cfg = MethodConfig(name=method, loss=loss, train_steps="2", dkd_warmup_epochs=0, label_smoothing=smoothing)
    return build_distiller(cfg, student, teacher, input_shape=(1, 8, 8)).train()


def _cases():
    for method, m in METHODS.items():
        for loss in (("kd", "dkd", "dist") if m.flow else (m.options.get("loss_name", "kd"),)):
            for smoothing in (0.0, 0.1):
                yield pytest.param(method, loss, smoothing, id=f"{method}-{loss}-ls{smoothing}")


@pytest.mark.parametrize("method,loss,smoothing", list(_cases()))
def test_a_one_hot_soft_target_gives_the_hard_labels_losses(method, loss, smoothing):
    distiller = _distiller(method, loss, smoothing)
    x, y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 4, 2, 2, 1, 3])
    losses = {}
    for target in (y, F.one_hot(y, 5).float()):
        torch.manual_seed(2)
        _, parts = distiller(x, target, 0.5)
        losses[target.dim()] = {k: v.item() for k, v in parts.items()}
    assert losses[1].keys() == losses[2].keys()
    for k in losses[1]:
        assert losses[2][k] == pytest.approx(losses[1][k], abs=1e-6, rel=0), (k, losses)


def test_ce_and_dkd_on_mixed_targets():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    a, b, lam = torch.tensor([1, 2, 3, 0]), torch.tensor([5, 2, 0, 4]), 0.7
    soft = lam * F.one_hot(a, 6).float() + (1 - lam) * F.one_hot(b, 6).float()
    want = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)  # CE is linear in the target
    assert ce_loss(logits, soft).item() == pytest.approx(want.item(), abs=1e-6)
    smoothed = ce_loss(logits, soft, 0.1)  # smoothing the mix = mixing the smoothed one-hots (timm's target)
    timm_target = lam * (F.one_hot(a, 6) * 0.9 + 0.1 / 6) + (1 - lam) * (F.one_hot(b, 6) * 0.9 + 0.1 / 6)
    assert smoothed.item() == pytest.approx(-(timm_target * logits.log_softmax(1)).sum(1).mean().item(), abs=1e-6)
    assert torch.equal(hard_target(soft), a) and torch.equal(hard_target(a), a)  # lam > 0.5: the image's own class
    assert torch.equal(dkd_loss(logits, teacher, soft), dkd_loss(logits, teacher, a))


# ------------------------------------------------------------------------------------------ Mixup / CutMix
def _global_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_mixup_is_timms_reproducible_from_the_seed_and_leaves_the_global_generators_alone():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixer = BatchMixer(0.8, 1.0, num_classes=10, seed=3, rank=0)
    before = _global_states()
    out = [mixer(x.clone(), y, epoch=1, step=s) for s in range(6)]
    assert _same_states(before, _global_states())
    torch.manual_seed(123), np.random.seed(5), random.seed(7)  # other draws in between change nothing
    again = mixer(x.clone(), y, epoch=1, step=2)
    assert torch.equal(again[0], out[2][0]) and torch.equal(again[1], out[2][1])
    assert not all(torch.equal(out[0][1], o[1]) for o in out[1:])  # each step draws its own mix
    other_rank = BatchMixer(0.8, 1.0, num_classes=10, seed=3, rank=1)(x.clone(), y, epoch=1, step=2)
    assert not torch.equal(other_rank[1], out[2][1])
    for images, targets in out:
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
        lam = targets[0, 0].item()  # image 0 mixed with image 7 (timm: the batch reversed)
        assert targets[0, 7].item() == pytest.approx(1 - lam) and targets[7, 0].item() == pytest.approx(1 - lam)
        assert torch.allclose(targets, lam * F.one_hot(y, 10) + (1 - lam) * F.one_hot(y.flip(0), 10))
        cut = ((images - x).abs() > 0) & ((images - x.flip(0)).abs() > 0)  # a pixel neither original: Mixup
        mixed = lam * x + (1 - lam) * x.flip(0)
        assert torch.allclose(images, mixed, atol=1e-6) or not cut.any()  # Mixup everywhere, or CutMix's box
    # the same draws as timm's Mixup given numpy's generator seeded the same way
    from timm.data import Mixup

    ref = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=10)
    with seeded_global_rngs(mixer.generator(1, 4)):
        want = ref(x.clone(), y)
    assert torch.equal(want[0], out[4][0]) and torch.equal(want[1], out[4][1])


def test_the_mixing_step_reads_epoch_and_step_from_progress():
    seen = []
    mixer = BatchMixer(0.8, 0.0, num_classes=4)
    step = MixingStep(lambda images, targets, progress: seen.append((images, targets, progress)), mixer, iters=7)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    for epoch, s in [(0, 0), (0, 6), (3, 5), (250, 3)]:
        step(x.clone(), y, epoch + s / 7)
        want = mixer(x.clone(), y, epoch, s)
        assert torch.equal(seen[-1][0], want[0]) and torch.equal(seen[-1][1], want[1])


def test_with_every_key_off_the_run_keeps_its_own_step_and_pipeline():
    """A default run's code paths are the ones it had: the step is not wrapped, no per-image transform is built,
    the DKD and CE paths take the hard labels as before, and the default teacher's cache key is unchanged."""
    class Run:
        cfg, world, rank = Config(), 1, 0

    step = object()
    assert with_mixing(step, Run()) is step
    assert build_image_augment(DataConfig(), 224, (0.5,) * 3, (0.25,) * 3) is None
    new = ("augment_policy", "reprob", "repeated_aug", "mixup", "cutmix")
    assert all(_LATER_DATA_KEYS[k] == getattr(DataConfig(), k) for k in new)  # left out of the cache key


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    result = runner.invoke(app, ["distill", "--data", "digits", "--epochs", "1", "--batch-size", "16",
                                 "--set", "data.train_subset=48", "--set", "data.test_subset=16", "--set",
                                 "train.threads=1", "--out", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_seconds", "images_per_s")}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "artifact" / "fmkt.json").read_text())["weights_sha256"]


@pytest.fixture
def resnet8_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), path)
    return ["--teacher", path, "--teacher-arch", "resnet8"]


def test_every_key_set_off_trains_bit_identically(tmp_path, resnet8_teacher):
    base = [*resnet8_teacher, "--student", "resnet8", "--set", "method.train_steps=2", "--eval-steps", "1"]
    off = ["--set", "data.mixup=0", "--set", "data.cutmix=0", "--set", "data.reprob=0", "--set",
           "data.augment_policy=", "--set", "data.repeated_aug=0"]
    assert _run(tmp_path, "default", *base) == _run(tmp_path, "off", *base, *off)


@pytest.mark.parametrize("method", ["fmkt", "dkd"])
def test_a_vit_student_trains_with_mixup_and_cutmix(method, tmp_path, resnet8_teacher):
    """timm's DeiT-Tiny (32 x 32, 4 x 4 patches) on digits, Mixup 0.8 + CutMix 1.0 and label smoothing: 3 steps
    with a finite loss (DKD through the soft target's argmax)."""
    metrics, _ = _run(tmp_path, method, *resnet8_teacher, "--student", "timm:deit_tiny_patch16_224",
                      "--method", method, "--set", "data.image_size=32", "--set", "student_kwargs.img_size=32",
                      "--set", "student_kwargs.patch_size=4", "--set", "method.encoder=mlp", "--set",
                      "method.train_steps=2", "--eval-steps", "1,2", "--set", "data.mixup=0.8", "--set",
                      "data.cutmix=1.0", "--set", "method.label_smoothing=0.1")
    assert len(metrics) == 1 and math.isfinite(metrics[0]["train_loss"]) and metrics[0]["top1"]


# ------------------------------------------------------------------------------------------ per-image
def _crop(seed=0, size=32):
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_image_augment_is_timms_randaugment_and_erasing_seeded_by_the_generator():
    from timm.data.auto_augment import RandAugment, rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_pil_interp
    from PIL import Image

    aug = ImageAugment(32, *IMAGENET, policy="rand-m9-mstd0.5-inc1", reprob=0.25)
    assert isinstance(aug.rand_augment[0], RandAugment) and isinstance(aug.erasing, RandomErasing)
    assert aug.erasing.mode == "pixel" and aug.erasing.probability == 0.25
    image = _crop()
    before = _global_states()
    outs = [aug(image, image_generator(0, 1, i)) for i in range(12)]
    assert _same_states(before, _global_states())  # timm drew from seeded copies of the global generators
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) > 6  # items draw differently
    assert torch.equal(aug(image, image_generator(0, 1, 3)), outs[3])  # and the same item again the same
    assert not torch.equal(aug(image, image_generator(0, 1, 3, repeat=1)), outs[3])  # a repeated copy differs
    # the RandAugment alone is timm's DeiT transform (its hparams from create_transform) under the same seeds
    ra = ImageAugment(32, *IMAGENET, policy="rand-m9-mstd0.5-inc1")
    ref = rand_augment_transform("rand-m9-mstd0.5-inc1", dict(translate_const=int(32 * 0.45),
                                                                img_mean=(124, 116, 104),
                                                                interpolation=str_to_pil_interp("bicubic")))
    for i in range(6):
        with seeded_global_rngs(image_generator(0, 2, i)):
            want = np.asarray(ref(Image.fromarray(image.permute(1, 2, 0).numpy())))
        assert np.array_equal(ra(image, image_generator(0, 2, i)).permute(1, 2, 0).numpy(), want)


def test_random_erasing_changes_one_region_and_leaves_every_other_pixel_exact():
    aug = ImageAugment(32, *IMAGENET, reprob=1.0)
    assert aug.rand_augment == []
    image = _crop(1)
    for i in range(5):
        out = aug(image, image_generator(4, 0, i))
        changed = (out != image).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert changed.sum() > 0
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.9  # one rectangle (a noise pixel may round back to its old value)


def test_repeated_augmentation_is_timms_repeat_aug_sampler():
    from timm.data.distributed_sampler import RepeatAugSampler

    for n, world, repeats, epoch in [(10, 1, 3, 0), (300, 2, 3, 4), (1000, 8, 3, 1), (37, 3, 2, 2)]:
        counts = set()
        for rank in range(world):
            timm = RepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=repeats)
            timm.set_epoch(epoch)
            items, copies = repeated_indices(n, repeats, seed=0, epoch=epoch, rank=rank, world=world)
            assert items.tolist() == list(timm) and len(items) == len(timm) == repeated_length(n, world, repeats)
            counts.add(len(items))
        assert len(counts) == 1  # every rank has the same number of items (and so of batches)
    timm = RepeatAugSampler(list(range(100)), num_replicas=2, rank=1, num_repeats=3)
    timm.set_epoch(5)  # timm seeds the permutation with the epoch, fmkt with seed + epoch
    assert repeated_indices(100, 3, seed=2, epoch=3, rank=1, world=2)[0].tolist() == list(timm)
    items, copies = repeated_indices(9, 3, seed=5, epoch=0, rank=0, world=1)
    assert [sorted(copies[items == i].tolist()) for i in items.unique()] == [[0, 1, 2]] * 3  # 3 of 9 files, 3 copies
    shards = [repeated_indices(30, 3, seed=5, epoch=0, rank=r, world=3) for r in range(3)]
    assert all(torch.equal(shards[0][0], s[0]) for s in shards)  # world 3: the same images on every rank, ...
    assert [s[1].unique().tolist() for s in shards] == [[0], [1], [2]]  # ... each rank another copy of them
