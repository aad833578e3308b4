"""ImageNet ResNets (resnet18, resnet34, resnet50): torchvision's own ``torchvision.models.ResNet`` with the zoo's
interface.

The modules, their names (``conv1``, ``bn1``, ``layerL.B.convK``/``bnK``, ``layerL.0.downsample.{0,1}``, ``fc``),
the blocks (``BasicBlock``; ``Bottleneck`` with the stride on its 3x3 conv, "ResNet v1.5"), the initialisation and
the forward are torchvision's, so ``torchvision.models.resnet18(...).state_dict()`` and checkpoints of fmkt's
earlier hand-written copy load with ``strict=True`` and give the same logits. fmkt adds ``num_features``,
``forward_features(x) -> (B, C, H, W)`` (the last stage, before the pool), ``get_classifier()``, ``forward_head``
(pool, flatten, ``fc``) and ``in_channels`` (a grey model's stem takes 1 channel). The pool is adaptive, so any
input of 32x32 or more works (the last map is 7x7 at 224x224, 1x1 at 32x32).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ._base import ZooModel, check_in_channels
from ._registry import register_model

__all__ = ["ImageNetResNet", "BasicBlock", "Bottleneck"]


class ImageNetResNet(ZooModel, ResNet):
    """``torchvision.models.ResNet(block, layers, num_classes, **kwargs)`` (any of its keyword arguments:
    ``zero_init_residual``, ``groups``, ``width_per_group``, ...) whose forward is the zoo's
    ``forward_head(forward_features(x))``, the same operations in the same order as torchvision's."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3, **kwargs):
        check_in_channels(in_channels)
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        if in_channels != 3:  # torchvision's stem is RGB: the same conv for other channel counts, its init too
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.num_features = self.fc.in_features
        self.stage_channels = [64] + [c * block.expansion for c in (64, 128, 256, 512)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


@register_model
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-18 (torchvision's): BasicBlock x [2, 2, 2, 2], 512 features."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-34 (torchvision's): BasicBlock x [3, 4, 6, 3], 512 features."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-50 (torchvision's): Bottleneck x [3, 4, 6, 3], 2048 features."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)
