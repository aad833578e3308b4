"""CIFAR MobileNetV2 at width 0.5 (mdistiller's ``mobile_half``, the "MobileNetV2" student).

Architecture and parameter names follow mdistiller's ``mdistiller/models/cifar/mobilenetv2.py``
(``conv1``, ``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``), so its published ``state_dict``
files load with ``strict=True``. Its ``AvgPool2d(input_size // 16, ceil_mode=True)`` (a global
average on 32x32 input, whose last map is 1x1) is replaced by adaptive average pooling, and the
``input_size % 32 == 0`` assertion is dropped, so any input size works.
"""

from __future__ import annotations


import torch
from torch import nn

from ._base import ZooModel, check_in_channels, init_weights_mdistiller
from ._registry import register_model

__all__ = ["MobileNetV2", "InvertedResidual"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            # pw
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # dw
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # pw-linear
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(ZooModel):
    def __init__(self, T: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.interverted_residual_setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(check_in_channels(in_channels), input_channel, 2)

        self.blocks = nn.ModuleList([])
        for t, c, n, s in self.interverted_residual_setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.num_features = self.last_channel
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.stage_channels = [int(c * width_mult) for c in [32, 24, 32, 96, 320]]
        self._initialize_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        return self.conv2(out)

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]

    def _initialize_weights(self) -> None:
        init_weights_mdistiller(self)


@register_model
def mobilenetv2(num_classes: int = 100, in_channels: int = 3, **kwargs) -> MobileNetV2:
    """MobileNetV2, expansion 6, width 0.5 (mdistiller ``mobile_half``)."""
    kwargs.setdefault("T", 6)
    kwargs.setdefault("width_mult", 0.5)
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, **kwargs)
