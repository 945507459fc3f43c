"""ResNet-18 and ResNet-50 with torchvision's module names and state_dict keys; each block has its own
ReLU modules (relu1, relu2[, relu3]).

The official EGP code shares one ReLU per block (so only the stem was ever measured); separate
modules make every activation site visible to hooks (ReLUs hold no parameters, so torchvision's
state_dicts still load: conv1, bn1, layerN.M.conv1..conv3, bn1..bn3, downsample.0/1, fc).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from egp_deploy.archs.registry import register_arch


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)  # after the residual add
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)  # after the residual add
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        block: type[nn.Module] = BasicBlock,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise TypeError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.inplanes = width
        self.block = block
        if stem == "cifar":  # 3x3 stride 1, no max-pool: for 32x32 inputs
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [self.block(self.inplanes, planes, stride)]
        self.inplanes = planes * self.block.expansion
        layers += [self.block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_arch
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, stem: str = "cifar") -> ResNet:
    """ResNet-18 (17 ReLUs). ``stem='cifar'`` (3x3, no max-pool) or ``'imagenet'`` (7x7/2 + max-pool)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width, stem)


@register_arch
def resnet50(num_classes: int = 10, in_channels: int = 3, width: int = 64, stem: str = "imagenet") -> ResNet:
    """ResNet-50 (Bottleneck, 49 ReLUs), torchvision's layout: ``width=64, stem='imagenet',
    num_classes=1000`` loads torchvision's resnet50 state_dict. ``width`` scales every stage."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width, stem, Bottleneck)
