"""VGG-16 with BatchNorm, torchvision's names (features.N, classifier.N).

15 activation sites: 13 convs and two hidden classifier layers, as in the EGP/EASIER CIFAR runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from egp_deploy.archs.registry import register_arch

_CFG_16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(
        self, cfg: list, num_classes: int = 10, in_channels: int = 3, width: int = 64,
        hidden: int | None = None, pool_size: int = 1, dropout: float = 0.5,
    ) -> None:
        super().__init__()
        scale = width / 64
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = max(1, int(v * scale))
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        hidden = hidden or c
        self.classifier = nn.Sequential(
            nn.Linear(c * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_arch
def vgg16_bn(
    num_classes: int = 10, in_channels: int = 3, width: int = 64, hidden: int | None = None,
    pool_size: int = 1,
) -> VGG:
    """VGG-16-BN. ``pool_size=7`` and ``hidden=4096`` give torchvision's ImageNet head."""
    return VGG(_CFG_16, num_classes, in_channels, width, hidden, pool_size)
