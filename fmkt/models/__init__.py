"""The model zoo of the knowledge-distillation literature (CIFAR and ImageNet), behind a timm-style registry.

``create_model(name, num_classes=100, in_channels=3)`` builds any of ``list_models()``. Every model
has ``num_features``, ``forward_features(x) -> (B, C, H, W)``, ``forward_head(feat) -> logits``
(global average pool, flatten, ``get_classifier()``) and ``forward = forward_head o forward_features``.
Architectures and parameter names follow mdistiller's CIFAR definitions, so its published
``state_dict`` files load with ``strict=True``; the ImageNet models (resnet18, resnet34, resnet50,
mobilenet_v1) follow torchvision's ResNets and mdistiller's MobileNetV1 in the same way (their factories default
to 1000 classes).
"""

from ._registry import create_model, list_models, register_model
from . import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401  (registers the models)
from . import mobilenetv1, resnet_imagenet  # noqa: F401  (the ImageNet models)

__all__ = ["create_model", "list_models", "register_model"]
