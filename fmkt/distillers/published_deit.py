"""PUBLISHED_DEIT: the paper's ViT row, DeiT3-Small -> DeiT-Tiny on ImageNet-1k, FM-KT with the official config's
choices and KD / DKD / DIST at their DeiT settings, each with its source (``Settings`` as in
fmkt.distillers.published; ``scripts/make_recipes.py`` writes ``fmkt/recipes/imagenet_deit3_small_deit_tiny[_<key>]``
from here).

The repositories (every path below is inside one of them, at the commit named):
- FM-KT's DeiT code: github.com/shaoshitong/FM-KT-DeiT @ 9158064d4d33200acf56d160882efaeab2338839 (mmcls 1.x,
  built on ViTKD/NKD's cls_KD; its distillation config keeps the KD and DKD settings of that line of work).
- cls_KD (ViTKD, NKD): github.com/yzd-v/cls_KD @ e21ad377df0665bc94c64eb55d5e6f99187fb767, the same
  ``configs/distillers/imagenet/deit-s3_distill_deit-t_img.py`` KD / DKD blocks.
- DIST: fmkt.distillers.published's DIST_KD and DIST_CLS (no DeiT setting there: see the dist entry).

Every DeiT recipe trains as the authors' DeiT-Tiny config does (the distillation configs inherit it): AdamW, batch
1024, label smoothing 0.1, RandAugment, random erasing and Mixup/CutMix from timm (``data.augment_policy``,
``data.reprob``, ``data.mixup``, ``data.cutmix``: fmkt.data.deit_aug, fmkt.mixing), no repeated augmentation (the
config's DefaultSampler), 300 epochs.
"""
from __future__ import annotations

from fmkt.distillers.published import DIST_CLS, DIST_KD, Settings

FMKT_DEIT = "shaoshitong/FM-KT-DeiT@9158064d4d33200acf56d160882efaeab2338839"
CLS_KD = "yzd-v/cls_KD@e21ad377df0665bc94c64eb55d5e6f99187fb767"
DISTILL_CONFIG = "configs/distillers/imagenet/deit-s3_distill_deit-t_img.py"

#: (teacher, student): the official teacher is mmcls's deit3-small-p16_in21k-pre_3rdparty_in1k, Facebook's DeiT III
#: Small 224 pre-trained on ImageNet-21k and fine-tuned on 1k, which timm names with the tag below.
DEIT_PAIRS: tuple[tuple[str, str], ...] = (
    ("timm:deit3_small_patch16_224.fb_in22k_ft_in1k", "timm:deit_tiny_patch16_224"),)

# configs/_base_/schedules/imagenet_bs1024_adamw_swin.py: AdamW lr 5e-4 * 1024 / 512, wd 0.05 (betas 0.9/0.999 and
# eps 1e-8: torch's defaults) with no decay on norms, biases, cls_token and pos_embed (paramwise_cfg), gradients
# clipped at norm 5 (optim_wrapper clip_grad), LinearLR warm-up for 20 epochs from 1e-3 x lr, then cosine to 1e-5
# (CosineAnnealingLR eta_min); 300 epochs. (momentum and Nesterov are SGD's and unused by AdamW; written so every
# recipe lists the same optim keys.)
DEIT_ADAMW = {"name": "adamw", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05,
              "scheduler": "cosine", "milestones": [], "gamma": 0.1, "warmup_epochs": 20.0, "warmup_start": 1e-3,
              "min_lr": 1e-5, "no_decay": True, "clip_grad": 5.0}
# configs/_base_/datasets/imagenet_bs64_swin_224.py (RandAugment policies 'timm_increasing', 2 of them, magnitude 9
# of 10, std 0.5 = timm's "rand-m9-mstd0.5-inc1"; RandomErasing p 0.25, mode 'rand' = timm's 'pixel'; sampler
# DefaultSampler) and configs/deit/deit-small_pt-4xb256_in1k.py (train_cfg augments Mixup 0.8, CutMix 1.0)
DEIT_AUGMENT = {"augment_policy": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "repeated_aug": 0, "mixup": 0.8,
                "cutmix": 1.0}
DEIT_BATCH = 1024  # 256 per GPU (train_dataloader batch_size) x 4 GPUs (vitkd.md: tools/dist_train.sh CONFIG 4)
DEIT_EPOCHS = 300

SOLVER_SOURCE = (
    f"{FMKT_DEIT}: configs/deit/deit-tiny_pt-4xb256_in1k.py and its base deit-small_pt-4xb256_in1k.py "
    "(LabelSmoothLoss 0.1; Mixup alpha 0.8 and CutMix alpha 1.0; 256 images per GPU, 4 GPUs as vitkd.md trains; paramwise_cfg: no decay "
    "on norms, biases, cls_token, pos_embed; clip_grad max_norm 5), configs/_base_/schedules/imagenet_bs1024_adamw_swin.py "
    "(AdamW lr 5e-4 x 1024/512, wd 0.05, flat_decay_mult 0; LinearLR start_factor 1e-3 for 20 epochs, "
    "CosineAnnealingLR eta_min 1e-5, 300 epochs), configs/_base_/datasets/imagenet_bs64_swin_224.py (RandAugment timm_increasing, 2 ops, "
    "magnitude 9, std 0.5; RandomErasing 0.25, mode rand; DefaultSampler: no repeated augmentation)")
SOLVER_NOTE = (
    "not followed from the DeiT config: bicubic crops and evaluation resize (fmkt's are bilinear), CutMix/Mixup's "
    "partner image (timm's: the batch reversed; mmcls's: a random permutation), and the schedule stepped per "
    "iteration for both phases (mmcls: the warm-up per iteration, the cosine per epoch)")
_COMMON = {"label_smoothing": 0.1}


def _deit(method: dict, source: str, note: str) -> Settings:
    return Settings({**method, **_COMMON}, DEIT_ADAMW, DEIT_BATCH, f"{source}; {SOLVER_SOURCE}",
                    note=f"{note}; {SOLVER_NOTE}" if note else SOLVER_NOTE, epochs=DEIT_EPOCHS,
                    data=dict(DEIT_AUGMENT))


PUBLISHED_DEIT: dict[str, Settings] = {
    "fmkt": _deit(
        {"name": "fmkt", "loss": "dist", "loss_params": {"beta": 2.0, "gamma": 2.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "encoder": "mlp", "encoder_params": {"depth": 2, "expansion": 1},
         "schedule": "rectified", "train_steps": "8", "eval_steps": [1, 2, 4, 8], "dirac_ratio": 1.0},
        f"{FMKT_DEIT}: {DISTILL_CONFIG} (FlowLoss: loss_type logit_based, flow_loss_type dist, encoder_type mlp, "
        "number 2, inference_sampling 8; teacher deit3-small in21k-pre), mmcls/models/classifiers/distiller.py "
        "(FMKTClassificationDistiller: the student's class token into FlowAlignModule(student_size 7, sampling 8); "
        "cls_loss = the student head's LabelSmoothLoss), mmcls/models/classifiers/common.py (FlowAlignModule: the "
        "token expanded to a 7 x 7 map, rectified flow, per step (D + CE) / N with weight 1, Dirac ratio 1; "
        "DISTLoss(beta=2, gamma=2, tem=1) for 'dist')",
        "the official row also trains ViTKD (ViTKDLoss, alpha 3e-5, beta 3e-6, lambda 0.5, on the tokens of the first "
        "two and the last blocks), which fmkt does not implement: this recipe is FM-KT alone. The meta-encoder is "
        "fmkt's mlp at the official depth (2) and width (expansion 1), with pre-norm residual blocks and a final 1x1 "
        "conv where the official blocks are post-norm without biases; S is the student's own head (pool + Linear "
        "on the final-normed class token) where the official adds a new pool + Linear(192, 1000)"),
    "kd": _deit(
        {"name": "kd", "loss_params": {"temperature": 1.0}, "ce_weight": 0.5, "loss_weight": 0.5},
        f"{FMKT_DEIT}: {DISTILL_CONFIG} (KDLoss temp 1, alpha 0.5; the same block as {CLS_KD}: {DISTILL_CONFIG}), "
        "mmcls/models/dis_losses/kd.py (alpha T^2 x the teacher's soft CE; the label-smoothed CE times 1 - alpha), "
        "mmcls/models/classifiers/distiller.py (ClassificationDistiller)",
        "the authors' KD term is alpha T^2 CE(teacher, student), fmkt's alpha T^2 KL: the same gradients, the loss "
        "lower by alpha T^2 H(teacher)"),
    "dkd": _deit(
        {"name": "dkd", "loss_params": {"alpha": 1.0, "beta": 0.5, "temperature": 1.0}, "ce_weight": 1.0,
         "loss_weight": 1.0, "dkd_warmup_epochs": 0.0},
        f"{FMKT_DEIT}: {DISTILL_CONFIG} (DKDLoss temp 1, alpha 1, beta 0.5; the same block as {CLS_KD}: "
        f"{DISTILL_CONFIG}), mmcls/models/dis_losses/dkd.py (no warm-up), mmcls/models/classifiers/distiller.py "
        "(the label-smoothed CE at weight 1)",
        "under Mixup/CutMix the ground-truth class DKD needs is the soft target's argmax (fmkt.losses.hard_target): "
        "the authors' DKDLoss takes the mixed label as a class index and fails on it"),
    "dist": _deit(
        {"name": "dist", "loss_params": {"beta": 1.0, "gamma": 1.0, "tau": 1.0}, "ce_weight": 1.0,
         "loss_weight": 2.0},
        f"{DIST_KD}: README.md (ImageNet: resnet_dist.yaml for the baseline pairs, dist_b2.yaml for stronger "
        f"strategies); {DIST_CLS}: configs/strategies/distill/resnet_dist.yaml and dist_b2.yaml (both kd: dist, "
        "ori_loss_weight 1, kd_loss_weight 2), lib/models/losses/kd_loss.py (dist = DIST(beta=1, gamma=1, tau=1))",
        "no published DIST setting for DeiT exists in these sources (DIST's only ViT-family row, Swin-L -> Swin-T, "
        "was trained on Swin's own code, no config published; image_classification_sota has no distillation config "
        "for a ViT): our choice is DIST's ImageNet loss and weights on the DeiT solver and augmentation of the other "
        "DeiT recipes"),
}


def deit_settings(key: str, teacher: str, student: str) -> dict:
    """The config overrides of PUBLISHED_DEIT[key] for the pair (teacher, student)."""
    return PUBLISHED_DEIT[key].overrides(teacher, student)
