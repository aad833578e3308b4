"""PUBLISHED: each method at its authors' published CIFAR-100 settings, with where every number comes from;
PUBLISHED_IMAGENET: the same for ImageNet-1k (ResNet-34 -> ResNet-18, ResNet-50 -> MobileNetV1); the paper's ViT
row (DeiT3-Small -> DeiT-Tiny) is fmkt.distillers.published_deit.PUBLISHED_DEIT.

One entry per method (and per method with logit standardization, "+ls"): the ``method`` section (MethodConfig
fields), the optimiser (OptimConfig fields), the batch size, the source (file path and commit of the authors'
repository) and any per-pair difference, keyed by (teacher, student). ``settings(key, teacher, student)`` gives the
config overrides (nested like a YAML recipe); ``scripts/make_recipes.py`` writes the shipped recipes
``fmkt/recipes/cifar100_<teacher>_<student>[_<key>].yaml`` (and ``imagenet_...`` from PUBLISHED_IMAGENET) from
here, so the numbers live in this file only.

The repositories (every path below is inside one of them, at the commit named):
- mdistiller: github.com/megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259 (KD, DKD).
- DIST: github.com/hunto/DIST_KD @ 2418f18b1fedd7c2646a7b1b9a27d5c674c2170b, whose ``classification`` submodule is
  github.com/hunto/image_classification_sota @ d9662f7df68fe46b973c4580b7c9b896cedcd301.
- LS: github.com/sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754 (mdistiller-based).
- FM-KT: the authors' code is not mirrored here; docs/method.md holds its settings in our words.
- torchvision's reference ImageNet recipe (the field's standard, for comparison): github.com/pytorch/vision
  references/classification/README.md (defaults: 8 GPUs x batch 32, lr 0.1, momentum 0.9, wd 1e-4, 90 epochs,
  x0.1 every 30; ResNets "torchrun --nproc_per_node=8 train.py --model $MODEL"): the recipe to which torchvision
  0.29.1's ResNet*_Weights.IMAGENET1K_V1 point (meta "recipe": .../references/classification#resnet).

DKD's warm-up (``dkd_warmup_epochs`` = mdistiller's DKD.WARMUP) follows mdistiller's count: its trainer numbers
epochs from 1 (mdistiller/engine/trainer.py: ``epoch = 1``) and DKD.py scales the loss by ``min(epoch / WARMUP,
1)``, a factor held for the whole epoch and already 1/WARMUP in the first. fmkt computes exactly that
(distillers/base.py, warmup_factor; the factor reaches 1 in epoch WARMUP). So WARMUP 20 on CIFAR-100 is 20 as
written, and ImageNet's WARMUP 1 means no ramp at all, which the ImageNet entries write as 0.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

MDISTILLER = "megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259"
DIST_KD = "hunto/DIST_KD@2418f18b1fedd7c2646a7b1b9a27d5c674c2170b"
DIST_CLS = "hunto/image_classification_sota@d9662f7df68fe46b973c4580b7c9b896cedcd301"
LS_KD = "sunshangquan/logit-standardization-KD@f6e5aa5172bad618e801163c3385322eea673754"

#: The CIFAR-100 (teacher, student) pairs fmkt ships recipes for (mdistiller/RepDistiller's names).
CIFAR100_PAIRS: tuple[tuple[str, str], ...] = (
    ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("vgg13", "vgg8"))

# The CIFAR-100 solver of mdistiller's KD/DKD configs (configs/cifar100/kd.yaml, configs/cifar100/dkd/*.yaml), of
# the LS authors' (the same files in their fork) and of DIST's dist_cifar.yaml (warm-up at the base lr for 120
# epochs, then x0.1 every 30: the same milestones): SGD momentum 0.9 without Nesterov (mdistiller/engine/trainer.py:
# optim.SGD(lr, momentum, weight_decay); DIST: sgd_no_nesterov), lr 0.05, x0.1 at epochs 150/180/210
# (mdistiller/engine/utils.py adjust_learning_rate), wd 5e-4 on every parameter, batch 64, 240 epochs.
CIFAR_SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
             "scheduler": "multistep", "milestones": [150, 180, 210], "gamma": 0.1, "warmup_epochs": 0.0}
FMKT_SGD = {**CIFAR_SGD, "nesterov": True}  # docs/method.md: the same solver with Nesterov, batch 128


@dataclass(frozen=True)
class Pair:
    """What one (teacher, student) pair sets differently from the method's settings, and where that is said."""

    method: dict  # MethodConfig fields (a dict value, such as loss_params, is merged key by key)
    source: str


@dataclass(frozen=True)
class Settings:
    """One method at its published settings: config sections to override, and where each number comes from."""

    method: dict  # MethodConfig fields
    optim: dict  # OptimConfig fields
    batch_size: int
    source: str  # file paths @ commit
    per_pair: dict = field(default_factory=dict)  # {(teacher, student): Pair}
    note: str = ""  # what is ours, not the authors' (said in every recipe written from it)
    epochs: int = 240
    data: dict = field(default_factory=dict)  # DataConfig fields besides the batch (DeiT's augmentation)

    def overrides(self, teacher: str, student: str) -> dict:
        """The config overrides for one pair, nested as a YAML recipe holds them."""
        method = copy.deepcopy(self.method)
        pair = self.per_pair.get((teacher, student))
        for key, value in (pair.method if pair else {}).items():
            method[key] = {**method.get(key, {}), **value} if isinstance(value, dict) else value
        return {"student": student, "data": {"batch_size": self.batch_size, **copy.deepcopy(self.data)},
                "teacher": {"arch": teacher},
                "method": method, "optim": copy.deepcopy(self.optim), "train": {"epochs": self.epochs}}


def _ls_dkd(base_temp: float, kd_weight: float, beta: float) -> dict:
    """The LS authors' DKD (tools/train.py with --logit-stand): ALPHA and BETA times --kd-weight, T = --base-temp."""
    return {"loss_params": {"alpha": 1.0 * kd_weight, "beta": beta * kd_weight, "temperature": base_temp}}


def _dkd_beta(config: str, beta: float) -> Pair:
    return Pair({"loss_params": {"beta": beta}}, f"{MDISTILLER}: configs/cifar100/dkd/{config}.yaml "
                f"({'BETA ' + str(beta) if beta != 8.0 else 'no BETA: cfg.py BETA 8.0'})")


# The LS per-pair logs were committed before the code at LS_KD that these settings follow (the LS repository's log)
LS_KD_LOG_CAVEAT = (
    "; the log predates the 2024-03-10 change of mdistiller/engine/cfg.py's KD.LOSS.CE_WEIGHT from 1 to 0.1 "
    "(3ec213f): the code of its date trains with CE weight 1, these settings with 0.1")
LS_DKD_LOG_CAVEAT = (
    "; the log predates the 2024-05-18 change of tools/train.py's --logit-stand mapping (6b58661): the code of its "
    "date sets DKD.BETA = (ALPHA x kd-weight) x kd-weight = kd-weight^2 (the config's BETA ignored) and --base-temp "
    "sets KD.TEMPERATURE, which DKD does not read (DKD.T stays 4); these settings follow the code at the commit "
    "above: BETA x kd-weight, T = --base-temp")


def _ls_log(kind: str, teacher: str, student: str, temp: float, weight: float, beta: float | None = None, *,
            committed: str) -> Pair:
    """A pair of the LS README's table: its log file is named KD_TYPE,TEACHER,STUDENT,BASE_TEMP,KD_WEIGHT[,BETA];
    ``committed``: the date and commit that added the log, said with what changed in the code since."""
    name = f"{kind},{teacher},{student},{temp:g},{weight:g}" + (f",{beta:.1f}" if beta is not None else "")
    when = f" (committed {committed})"
    if kind == "kd":
        return Pair({"loss_params": {"temperature": temp}, "loss_weight": weight},
                    f"{LS_KD}: logs/KD/{name}.txt{when}{LS_KD_LOG_CAVEAT}")
    return Pair(_ls_dkd(temp, weight, 8.0 if beta is None else beta),
                f"{LS_KD}: logs/DKD/{name}.txt{when}" + ("" if beta is not None else " (BETA: cfg.py's 8.0)")
                + LS_DKD_LOG_CAVEAT)


PUBLISHED: dict[str, Settings] = {
    "kd": Settings(
        {"name": "kd", "loss_params": {"temperature": 4.0}, "ce_weight": 0.1, "loss_weight": 0.9},
        CIFAR_SGD, 64,
        f"{MDISTILLER}: mdistiller/engine/cfg.py (KD.TEMPERATURE 4, KD.LOSS.CE_WEIGHT 0.1, KD.LOSS.KD_WEIGHT 0.9), "
        "configs/cifar100/kd.yaml (solver), mdistiller/engine/trainer.py (SGD without Nesterov)"),
    "dkd": Settings(
        {"name": "dkd", "loss_params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "dkd_warmup_epochs": 20.0},
        CIFAR_SGD, 64,
        f"{MDISTILLER}: mdistiller/engine/cfg.py (DKD.CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20), "
        "configs/cifar100/dkd/<pair>.yaml (solver, BETA per pair), mdistiller/engine/trainer.py (SGD without "
        "Nesterov)",
        per_pair={("resnet32x4", "resnet8x4"): _dkd_beta("res32x4_res8x4", 8.0),
                  ("wrn_40_2", "wrn_16_2"): _dkd_beta("wrn40_2_wrn_16_2", 6.0),
                  ("resnet56", "resnet20"): _dkd_beta("res56_res20", 2.0),
                  ("vgg13", "vgg8"): _dkd_beta("vgg13_vgg8", 6.0)}),
    "dist": Settings(
        {"name": "dist", "loss_params": {"beta": 1.0, "gamma": 1.0, "tau": 4.0}, "ce_weight": 1.0,
         "loss_weight": 2.0},
        CIFAR_SGD, 64,
        f"{DIST_KD}: README.md (CIFAR-100: configs/strategies/distill/dist_cifar.yaml for every pair); "
        f"{DIST_CLS}: configs/strategies/distill/dist_cifar.yaml (kd: dist_t4, ori_loss_weight 1, kd_loss_weight 2, "
        "batch 64, lr 0.05 held 120 epochs then x0.1 every 30 = at 150/180/210, wd 5e-4, sgd_no_nesterov), "
        "lib/models/losses/kd_loss.py (dist_t4 = DIST(beta=1, gamma=1, tau=4))"),
    "kd+ls": Settings(
        {"name": "kd", "loss_params": {"temperature": 2.0}, "ce_weight": 0.1, "loss_weight": 9.0,
         "logit_standardization": True},
        CIFAR_SGD, 64,
        f"{LS_KD}: README.md (KD+Ours: --logit-stand --base-temp 2 --kd-weight 9), tools/train.py (KD.TEMPERATURE = "
        "--base-temp, KD.LOSS.KD_WEIGHT = --kd-weight), mdistiller/engine/cfg.py (KD.LOSS.CE_WEIGHT 0.1), "
        "configs/cifar100/kd/<pair>.yaml (solver). The per-pair logs (logs/KD, committed 2024-03-01 to 03-03) "
        "predate the 2024-03-10 change of KD.LOSS.CE_WEIGHT from 1 to 0.1 (3ec213f): the code of their dates trains "
        "with CE weight 1, so their accuracies are not evidence for these settings",
        per_pair={("resnet32x4", "resnet8x4"): _ls_log("kd", "resnet32x4", "resnet8x4", 2.0, 9.0,
                                                       committed="2024-03-01, 3c2446f"),
                  ("wrn_40_2", "wrn_16_2"): _ls_log("kd", "wrn_40_2", "wrn_16_2", 2.0, 9.0,
                                                    committed="2024-03-01, 78195b4"),
                  ("resnet56", "resnet20"): _ls_log("kd", "resnet56", "resnet20", 2.0, 9.0,
                                                    committed="2024-03-03, 4e46e83"),
                  ("vgg13", "vgg8"): _ls_log("kd", "vgg13", "vgg8", 3.0, 9.0, committed="2024-03-01, 78195b4")}),
    "dkd+ls": Settings(
        {"name": "dkd", "ce_weight": 1.0, "loss_weight": 1.0, "dkd_warmup_epochs": 20.0,
         "logit_standardization": True, **_ls_dkd(2.0, 9.0, 8.0)},
        CIFAR_SGD, 64,
        f"{LS_KD}: README.md (DKD+Ours: --logit-stand --base-temp 2 --kd-weight 9), tools/train.py (DKD.ALPHA and "
        "DKD.BETA times --kd-weight, DKD.T = --base-temp), mdistiller/engine/cfg.py (DKD BETA 8, CE_WEIGHT 1, "
        "WARMUP 20), configs/cifar100/dkd/<pair>.yaml (solver). The per-pair logs (logs/DKD, committed 2024-03-01 "
        "to 03-12) predate the 2024-05-18 change of that mapping in tools/train.py (6b58661): the code of their dates "
        "sets BETA = kd-weight^2 and leaves T at 4, so their accuracies are not evidence for these settings",
        per_pair={("resnet32x4", "resnet8x4"): _ls_log("dkd", "resnet32x4", "resnet8x4", 2.0, 9.0,
                                                       committed="2024-03-01, e6ed3ce"),
                  ("wrn_40_2", "wrn_16_2"): _ls_log("dkd", "wrn_40_2", "wrn_16_2", 2.0, 12.0, 2.0,
                                                    committed="2024-03-05, 512a562"),
                  ("resnet56", "resnet20"): _ls_log("dkd", "resnet56", "resnet20", 3.0, 18.0, 2.0,
                                                    committed="2024-03-12, 37a90e7"),
                  ("vgg13", "vgg8"): _ls_log("dkd", "vgg13", "vgg8", 2.0, 15.0, 2.0,
                                             committed="2024-03-06, fc97b0a")}),
    "fmkt": Settings(
        {"name": "fmkt", "loss": "dist", "loss_params": {"beta": 2.0, "gamma": 2.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "encoder": "conv", "schedule": "rectified", "train_steps": "8",
         "eval_steps": [1, 2, 4, 8]},
        FMKT_SGD, 128,
        "docs/method.md (FM-KT's settings from the authors' code, which is not mirrored here: D = DIST with "
        "beta = gamma = 2, tau = 1, rectified flow, N = 8; SGD Nesterov 0.9, batch 128, 240 epochs, x0.1 at "
        "150/180/210, lr 0.05 and wd 5e-4, the docs' values for small students)"),
    "fmkt+ls": Settings(
        {"name": "fmkt", "loss": "dist", "loss_params": {"beta": 2.0, "gamma": 2.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "encoder": "conv", "schedule": "rectified", "train_steps": "8",
         "eval_steps": [1, 2, 4, 8], "logit_standardization": True},
        FMKT_SGD, 128,
        "the fmkt entry (docs/method.md) with logit standardization on",
        note="no paper publishes FM-KT with LS: this is FM-KT's published setting plus LS (whose authors publish no "
             "DIST weights), not a published number"),
}


def settings(key: str, teacher: str, student: str) -> dict:
    """The config overrides of PUBLISHED[key] for the pair (teacher, student)."""
    return PUBLISHED[key].overrides(teacher, student)


# ------------------------------------------------------------------------------------------------ ImageNet-1k
#: The ImageNet-1k (teacher, student) pairs fmkt ships recipes for, in zoo names: the literature's two
#: (mdistiller's configs/imagenet/r34_r18 and r50_mv1, DIST's README "R34-R18 and R50-MBV1").
IMAGENET_PAIRS: tuple[tuple[str, str], ...] = (("resnet34", "resnet18"), ("resnet50", "mobilenet_v1"))

# The ImageNet solver of mdistiller's configs/imagenet/{r34_r18,r50_mv1}/{kd,dkd}.yaml: SGD momentum 0.9 without
# Nesterov (mdistiller/engine/trainer.py), lr 0.2 at batch 512, wd 1e-4 on every parameter, 100 epochs, x0.1 at
# epochs 30/60/90 (LR_DECAY_STAGES). Per image the same lr as torchvision's reference (0.1 per 256), 10 epochs more.
IMAGENET_SGD = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                "scheduler": "multistep", "milestones": [30, 60, 90], "gamma": 0.1, "warmup_epochs": 0.0}
# DIST's resnet_dist.yaml: batch 32 per GPU on 8 GPUs (README: tools/dist_train.sh 8) = 256, lr 0.1, SGD with
# Nesterov (lib/utils/args.py: --sgd-no-nesterov not given), wd 1e-4, StepLR every 30 epochs x0.1 over 100 epochs.
DIST_IMAGENET_SGD = {**IMAGENET_SGD, "lr": 0.1, "nesterov": True, "no_decay": True}  # filter_bias_and_bn
FMKT_IMAGENET_SGD = {**IMAGENET_SGD, "nesterov": True}  # the baselines' solver, with Nesterov as FMKT_SGD (note)


def _imagenet_dkd_beta(config: str, beta: float) -> Pair:
    return Pair({"loss_params": {"beta": beta}}, f"{MDISTILLER}: configs/imagenet/{config}/dkd.yaml (BETA {beta})")


PUBLISHED_IMAGENET: dict[str, Settings] = {
    "kd": Settings(
        {"name": "kd", "loss_params": {"temperature": 1.0}, "ce_weight": 0.5, "loss_weight": 0.5},
        IMAGENET_SGD, 512,
        f"{MDISTILLER}: configs/imagenet/r34_r18/kd.yaml and configs/imagenet/r50_mv1/kd.yaml (KD.TEMPERATURE 1, "
        "KD.LOSS.CE_WEIGHT 0.5, KD.LOSS.KD_WEIGHT 0.5; SOLVER batch 512, lr 0.2, x0.1 at 30/60/90, wd 1e-4, "
        "momentum 0.9, 100 epochs), mdistiller/engine/trainer.py (SGD without Nesterov)",
        epochs=100),
    "dkd": Settings(
        {"name": "dkd", "loss_params": {"alpha": 1.0, "beta": 0.5, "temperature": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "dkd_warmup_epochs": 0.0},
        IMAGENET_SGD, 512,
        f"{MDISTILLER}: configs/imagenet/<pair>/dkd.yaml (DKD.CE_WEIGHT 1, BETA per pair, T 1, WARMUP 1; the "
        "solver as for KD), mdistiller/engine/cfg.py (DKD.ALPHA 1: the configs set none), "
        "mdistiller/engine/trainer.py (SGD without Nesterov)",
        per_pair={("resnet34", "resnet18"): _imagenet_dkd_beta("r34_r18", 0.5),
                  ("resnet50", "mobilenet_v1"): _imagenet_dkd_beta("r50_mv1", 2.0)},
        note="mdistiller counts epochs from 1, so its min(epoch / WARMUP, 1) at WARMUP 1 is 1 from the first step: "
             "no ramp, which fmkt's warm-up 0 states directly (fmkt's factor follows mdistiller's count: "
             "distillers/base.py, warmup_factor)",
        epochs=100),
    "dist": Settings(
        {"name": "dist", "loss_params": {"beta": 1.0, "gamma": 1.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 2.0},
        DIST_IMAGENET_SGD, 256,
        f"{DIST_KD}: README.md (ImageNet baseline settings for R34-R18 and R50-MBV1: "
        "configs/strategies/distill/resnet_dist.yaml on 8 GPUs); "
        f"{DIST_CLS}: configs/strategies/distill/resnet_dist.yaml (kd: dist, ori_loss_weight 1, kd_loss_weight 2, "
        "batch 32 per GPU, lr 0.1, sgd, momentum 0.9, wd 1e-4, step decay x0.1 every 30 epochs, 100 epochs, no "
        "warm-up, no EMA), lib/models/losses/kd_loss.py (dist = DIST(beta=1, gamma=1, tau=1)), lib/utils/optim.py "
        "(Nesterov)",
        note="DIST decays no bias or BatchNorm weight (lib/utils/optim.py, filter_bias_and_bn): optim.no_decay, "
             "which also spares the meta-encoder's biases and norms (every one-dimensional parameter)",
        epochs=100),
    "fmkt": Settings(
        {"name": "fmkt", "loss": "dist", "loss_params": {"beta": 2.0, "gamma": 2.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "encoder": "conv", "schedule": "rectified", "train_steps": "8",
         "eval_steps": [1, 2, 4, 8]},
        FMKT_IMAGENET_SGD, 512,
        "docs/method.md (FM-KT's method as on CIFAR-100: D = DIST with beta = gamma = 2, tau = 1, rectified flow, "
        "N = 8); the solver is the ImageNet baselines' (mdistiller's, see the kd entry) with Nesterov",
        note="docs/method.md gives FM-KT's ResNet ImageNet solver only as 'AdamW 5e-4, batch 1024, EMA': no weight "
             "decay, epochs or schedule, and fmkt keeps no EMA of the weights. Those three match the AdamW schedule "
             "of mmcls's DeiT configs (configs/_base_/schedules/imagenet_bs1024_adamw_swin.py: lr 5e-4 x 1024/512, "
             "wd 0.05, 300 epochs, cosine) on which the authors' DeiT code (shaoshitong/FM-KT-DeiT) builds. So "
             "this recipe runs FM-KT's method on the solver its ImageNet baselines use, with Nesterov as FM-KT's "
             "CIFAR solver: our choice, not a published setting",
        epochs=100),
}


def imagenet_settings(key: str, teacher: str, student: str) -> dict:
    """The config overrides of PUBLISHED_IMAGENET[key] for the ImageNet pair (teacher, student)."""
    return PUBLISHED_IMAGENET[key].overrides(teacher, student)
