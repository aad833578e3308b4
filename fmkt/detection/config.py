"""The config section of the detection task (``task: detection``; fmkt.config holds it as ``Config.detection``).

Everything else a detection run reads is the shared config's: ``student`` / ``teacher.arch`` (detector names or
import paths), ``student_kwargs`` / ``teacher.kwargs`` (the detectors' JSON-able keyword arguments, e.g.
``rpn_post_nms_top_n_train``), ``data.dir`` (the COCO-format root), ``data.batch_size`` (the global batch),
``data.workers``, ``method.name`` (fmkt | pkd | none), ``method.encoder``,
``method.schedule``, ``method.train_steps`` (N), ``method.dirac_ratio``, the optimiser, schedule (``optim.clip_grad``
included) and training keys. Plain types only: this module imports nothing of fmkt's stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DetectionConfig:
    # the splits of data.dir that fmkt.detection.coco.open_coco reads: ROOT/annotations/instances_SPLIT.json over the
    # images in ROOT/SPLIT/ (the canvases: train / val; COCO 2017: train2017 / val2017)
    train_split: str = "train"
    val_split: str = "val"
    # the detector transform's sizes; the loader resizes every image to min_size x min_size first (one static shape,
    # the aspect ratio not kept: fmkt.detection.transforms), so max_size matters only when it is below min_size's
    min_size: int = 128
    max_size: int = 128
    # the loss weight of each FPN level, in the detector's level order (fmkt's flow and pkd's terms alike); empty:
    # the authors' (Faster R-CNN [6, 6, 6, 6, 0], RetinaNet [10, 10, 10, 10, 0]; fmkt.detection.fpn_flow)
    weights: list = field(default_factory=list)
    loss: str = "pkd"  # D on the FPN maps, a map-comparing entry of fmkt.losses.LOSSES: pkd | mse
    refine: bool = True  # the heads see the flow's refined maps in training and at inference (the authors' neck)
    refine_steps: int = 4  # K at inference, the artifact's default_steps (the authors' inference_sampling=4)
    project_teacher: bool = True  # BN + 1x1 conv on the teacher's map (the authors' lowermodule)
    # the target velocity Z1 - T(teacher) without gradient into the student's map Z1 (ours; the authors detach nothing)
    detach_target: bool = False
    eval_batch_size: int = 8  # images per evaluation batch (a detector keeps up to 1000 proposals per image)
    # the student's backbone body from an ImageNet classifier's state-dict file (torchvision's resnet50-0676ba61.pth),
    # as torchvision's weights_backbone: its BatchNorm frozen, only the last trainable_backbone_layers stages train
    # (fmkt.detection.backbone); None: from scratch, every layer trainable. The student's only, never the teacher's
    backbone_weights: str | None = None
    trainable_backbone_layers: int = 3  # torchvision's default: ResNet 0..5 (3: layer2-4), MobileNetV3 0..6
