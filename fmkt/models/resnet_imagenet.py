"""ImageNet ResNets (resnet18, resnet34, resnet50): 7x7 stem, max pool, four stages.

Architecture and parameter names follow torchvision's ``torchvision/models/resnet.py`` (``conv1``, ``bn1``,
``layerL.B.convK``/``bnK``, ``layerL.0.downsample.{0,1}``, ``fc``; Bottleneck with the stride on its 3x3 conv,
"ResNet v1.5"), so ``torchvision.models.resnet18(...).state_dict()`` loads with ``strict=True``
(``tests/fixtures/torchvision_resnet_shapes.json`` holds torchvision's names and shapes). The pool is adaptive, so
any input of 32x32 or more works (the last map is 7x7 at 224x224, 1x1 at 32x32).
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import ZooModel, check_in_channels
from ._registry import register_model
from .resnet import BasicBlock

__all__ = ["ImageNetResNet", "Bottleneck"]


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision) -> 1x1 x4, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(ZooModel):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(check_in_channels(in_channels), 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self.stage_channels = [64] + [c * block.expansion for c in (64, 128, 256, 512)]

        for m in self.modules():  # torchvision's init (its nn.Linear keeps PyTorch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts at zero (Goyal et al. 2017), as torchvision's option
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

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
    """ImageNet ResNet-18 (torchvision's names): BasicBlock x [2, 2, 2, 2], 512 features."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-34 (torchvision's names): BasicBlock x [3, 4, 6, 3], 512 features."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-50 (torchvision's names): Bottleneck x [3, 4, 6, 3], 2048 features."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)
