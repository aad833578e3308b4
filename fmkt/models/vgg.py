"""CIFAR VGGs (vgg8, vgg11, vgg13), with batch norm by default.

Architecture and parameter names follow mdistiller's ``mdistiller/models/cifar/vgg.py``. The
registered names map like mdistiller's ``cifar_model_dict``: ``vgg8``/``vgg11``/``vgg13`` are its
``vgg8_bn``/``vgg11_bn``/``vgg13_bn`` (the published ``vgg13_vanilla`` teacher is a BN model);
pass ``batch_norm=False`` for the plain variants. Max-pools use ``ceil_mode=True`` so that inputs
as small as 8x8 stay valid (identical to floor mode for even sizes, e.g. 32x32). As in mdistiller,
``pool3`` is applied only for 64-pixel-high inputs (Tiny-ImageNet); ``pool4`` is the global
average pool before ``classifier``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, check_in_channels, init_weights_mdistiller
from ._registry import register_model

__all__ = ["VGG", "cfg"]

cfg = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


class VGG(ZooModel):
    pool_name = "pool4"

    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, check_in_channels(in_channels))
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])

        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))

        self.num_features = cfg[4][-1]
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.stage_channels = [c[-1] for c in cfg]
        self._initialize_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = F.relu(self.block0(x))
        x = self.pool0(x)
        x = F.relu(self.block1(x))
        x = self.pool1(x)
        x = F.relu(self.block2(x))
        x = self.pool2(x)
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        return F.relu(self.block4(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    @staticmethod
    def _make_layers(cfg: list[int], batch_norm: bool = True, in_channels: int = 3) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
        # the block's last ReLU is applied in forward_features (mdistiller drops it here too)
        return nn.Sequential(*layers[:-1])

    def _initialize_weights(self) -> None:
        init_weights_mdistiller(self)


@register_model
def vgg8(num_classes: int = 100, in_channels: int = 3, batch_norm: bool = True, **kwargs) -> VGG:
    return VGG(cfg["S"], batch_norm=batch_norm, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def vgg11(num_classes: int = 100, in_channels: int = 3, batch_norm: bool = True, **kwargs) -> VGG:
    return VGG(cfg["A"], batch_norm=batch_norm, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def vgg13(num_classes: int = 100, in_channels: int = 3, batch_norm: bool = True, **kwargs) -> VGG:
    return VGG(cfg["B"], batch_norm=batch_norm, num_classes=num_classes, in_channels=in_channels, **kwargs)
