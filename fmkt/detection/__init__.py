"""Object detection (issue 23): COCO-format data, its transforms and loader, COCO mAP, and the canvases dataset.

Modules: ``canvas`` (:func:`make_detection_data`: Fashion-MNIST items on canvases, in COCO format), ``coco``
(:func:`open_coco`: one split's files, boxes and labels, bad annotations counted and named), ``transforms``
(resize + flip with boxes, torchvision v2), ``loader`` (:class:`DetectionLoader`: seeded batches decoded by
DataLoader workers), ``coco_eval`` (:func:`coco_map` with pycocotools), ``backbone`` (:func:`with_backbone_weights`:
the student's backbone body from an ImageNet classifier file, as torchvision's ``weights_backbone``), ``artifact``
(the detection artifact: :func:`save_detector_artifact` / :func:`load_detector_artifact`). Public names load
lazily, so importing this package imports no torch, torchvision or pycocotools; a module adds its names to
:data:`_LAZY`.
"""
from __future__ import annotations

import importlib

#: public name -> the module of this package that defines it
_LAZY = {
    "make_detection_data": "canvas",
    "open_coco": "coco",
    "CocoSplit": "coco",
    "AnnotationReport": "coco",
    "train_transform": "transforms",
    "eval_transform": "transforms",
    "to_original": "transforms",
    "DetectionLoader": "loader",
    "coco_map": "coco_eval",
    "to_coco_results": "coco_eval",
    "create_detector": "models",
    "fpn_features": "models",
    "with_backbone_weights": "backbone",
    "FPNFlow": "fpn_flow",
    "attach_flow": "fpn_flow",
    "DetectionDistiller": "distiller",
    "save_detector_artifact": "artifact",
    "load_detector_artifact": "artifact",
    "is_detector_artifact": "artifact",
    "detector_spec": "artifact",
    "flow_spec": "artifact",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
