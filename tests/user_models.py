"""Models from "the user's own code base", for tests of models by reference (``user_models:tiny_cnn``).

Nothing here uses the package's module names: a residual branch is just ``a``/``b``."""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.an = nn.BatchNorm2d(width)
        self.act_a = nn.ReLU()
        self.b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_out(x + self.bn(self.b(self.act_a(self.an(self.a(x))))))


class TinyNet(nn.Module):
    """conv stem -> one residual block -> pooled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(width)
        self.stem_act = nn.ReLU()
        self.block = Block(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem_act(self.stem_norm(self.stem(x))))
        return self.head(x.mean((2, 3)))


def tiny_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 4) -> TinyNet:
    return TinyNet(num_classes, in_channels, width)


def three_channel_cnn(num_classes: int = 10) -> TinyNet:
    """A factory without in_channels: RGB input only (digits are then given three channels)."""
    return TinyNet(num_classes, 3)


NOT_A_FACTORY = 42


def not_a_model() -> int:
    return 3
