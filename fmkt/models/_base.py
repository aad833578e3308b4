"""The uniform interface shared by every model of the zoo."""

from __future__ import annotations

import torch
from torch import nn


class ZooModel(nn.Module):
    """Base class: ``forward(x) = forward_head(forward_features(x))``.

    A subclass sets ``num_features`` (channels of the last feature map), defines
    ``forward_features(x) -> (B, C, H, W)`` and ``get_classifier() -> nn.Linear``, and owns a
    global-average-pooling module named by ``pool_name`` (``avgpool`` unless the reference
    definition called it otherwise). ``forward_head`` is that pool, a flatten and the classifier.
    """

    num_features: int
    pool_name: str = "avgpool"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        pooled = getattr(self, self.pool_name)(feat)
        return self.get_classifier()(torch.flatten(pooled, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_in_channels(in_channels: int) -> int:
    """Validate the number of input channels (1 for grey images, 3 for RGB)."""
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int (1 or 3), got {in_channels!r}")
    return in_channels
