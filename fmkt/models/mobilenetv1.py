"""ImageNet MobileNetV1 (Howard et al. 2017, width 1.0, 224x224): the ResNet-50 -> MobileNetV1 student.

Architecture and parameter names follow mdistiller's ``mdistiller/models/imagenet/mobilenetv1.py`` (``model.0``:
conv-BN-ReLU 3 -> 32 stride 2; ``model.1`` ... ``model.13``: depthwise 3x3-BN-ReLU then pointwise 1x1-BN-ReLU;
``fc``), which DIST's ``lib/models/mobilenet_v1.py`` shares, so their ``state_dict`` files load with
``strict=True`` (``tests/fixtures/mdistiller_mobilenetv1_shapes.json``). Its ``AvgPool2d(7)`` (``model.14``, no
parameters) is replaced by adaptive average pooling, so any input of 32x32 or more works.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import ZooModel, check_in_channels
from ._registry import register_model

__all__ = ["MobileNetV1"]

# (output channels, stride) of the 13 depthwise-separable blocks after the stem
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),  # depthwise
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),  # pointwise
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(ZooModel):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        layers, channels = [conv_bn(check_in_channels(in_channels), 32, 2)], 32
        for out, stride in _BLOCKS:
            layers.append(conv_dw(channels, out, stride))
            channels = out
        self.model = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)
        self.stage_channels = [128, 256, 512, 1024]
        self._initialize_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def _initialize_weights(self) -> None:
        """DIST's ``_initialize_weight_goog`` (mdistiller's file keeps PyTorch's defaults): He-normal (fan-out)
        convs, unit BN, U(-1/sqrt(classes), 1/sqrt(classes)) Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.size(0))
                m.weight.data.uniform_(-bound, bound)
                m.bias.data.zero_()


@register_model
def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> MobileNetV1:
    """MobileNetV1, width 1.0 (mdistiller's / DIST's ``MobileNetV1``), 1024 features."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, **kwargs)
