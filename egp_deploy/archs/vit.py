"""A small Vision Transformer with GELU MLPs, torchvision's ViT module names.

Its activation sites are the GELUs of the MLP blocks (one per encoder layer); entropy on GELU is
a proxy (ON = x > 0) and removing a GELU is never exact, so surgery leaves them in place.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from egp_deploy.archs.registry import register_arch


class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_len: int, layers: int, heads: int, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp_dim, dropout)) for i in range(layers))
        )
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    def __init__(
        self, image_size: int = 32, patch_size: int = 4, layers: int = 12, heads: int = 4,
        dim: int = 192, mlp_dim: int = 384, num_classes: int = 10, in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise TypeError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq_len = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_len, layers, heads, dim, mlp_dim, dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (N, L, D): tokens, channel last
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


@register_arch
def vit_tiny(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
    layers: int = 12, heads: int = 4, width: int = 192, mlp_ratio: int = 2,
) -> VisionTransformer:
    """ViT for small images: 12 encoder layers (12 GELU sites, as Swin-T's 12 blocks), dim ``width``."""
    return VisionTransformer(image_size, patch_size, layers, heads, width, width * mlp_ratio, num_classes, in_channels)
