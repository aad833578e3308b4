"""CIFAR Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Architecture and parameter names follow mdistiller's ``mdistiller/models/cifar/wrn.py``, so its
published ``state_dict`` files load with ``strict=True``. ``forward_features`` ends with the final
``relu(bn1(.))``; the fixed ``F.avg_pool2d(x, 8)`` is replaced by adaptive average pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, check_in_channels
from ._registry import register_model

__all__ = ["WideResNet", "BasicBlock", "NetworkBlock"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            # pre-activation shared by the residual branch and the projection shortcut
            x = self.relu1(self.bn1(x))
            out = x
            shortcut = self.convShortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, block: type[BasicBlock], stride: int,
                 dropRate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ZooModel):
    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, dropRate: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        nChannels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 40), got {depth}")
        n = (depth - 4) // 6
        block = BasicBlock
        self.conv1 = nn.Conv2d(check_in_channels(in_channels), nChannels[0], kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.block1 = NetworkBlock(n, nChannels[0], nChannels[1], block, 1, dropRate)
        self.block2 = NetworkBlock(n, nChannels[1], nChannels[2], block, 2, dropRate)
        self.block3 = NetworkBlock(n, nChannels[2], nChannels[3], block, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(nChannels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(nChannels[3], num_classes)
        self.nChannels = nChannels[3]
        self.num_features = nChannels[3]
        self.stage_channels = nChannels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        return self.relu(self.bn1(out))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def _wrn(depth: int, widen_factor: int, num_classes: int, in_channels: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor, dropRate=drop_rate,
                      in_channels=in_channels)


@register_model
def wrn_16_1(num_classes: int = 100, in_channels: int = 3, **kwargs) -> WideResNet:
    return _wrn(16, 1, num_classes, in_channels, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 100, in_channels: int = 3, **kwargs) -> WideResNet:
    return _wrn(16, 2, num_classes, in_channels, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 100, in_channels: int = 3, **kwargs) -> WideResNet:
    return _wrn(40, 1, num_classes, in_channels, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 100, in_channels: int = 3, **kwargs) -> WideResNet:
    return _wrn(40, 2, num_classes, in_channels, **kwargs)
