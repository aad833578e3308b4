"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Architecture and parameter names follow mdistiller's ``mdistiller/models/cifar/resnet.py``
(BasicBlock variants), so its published ``state_dict`` files load with ``strict=True``.
The fixed ``AvgPool2d(8)`` is replaced by adaptive average pooling (same result on 32x32 input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, check_in_channels
from ._registry import register_model

__all__ = ["ResNet", "BasicBlock"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return F.relu(out)


class ResNet(ZooModel):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (e.g. 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        block = BasicBlock
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(check_in_channels(in_channels), num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = num_filters[3] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self.stage_channels = list(num_filters)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


@register_model
def resnet8(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(8, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet14(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(14, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet20(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(20, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet32(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(32, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet44(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(44, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet56(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(56, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet110(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(110, _SMALL, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet8x4(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(8, _X4, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet32x4(num_classes: int = 100, in_channels: int = 3, **kwargs) -> ResNet:
    return ResNet(32, _X4, num_classes=num_classes, in_channels=in_channels, **kwargs)
