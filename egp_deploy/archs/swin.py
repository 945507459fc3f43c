"""Swin Transformer (Swin-T by default) with torchvision's module names and state_dict keys.

``features.0`` patch embedding (Conv2d, Permute, LayerNorm); ``features.1/3/5/7`` stages of
SwinTransformerBlock (norm1, attn: qkv, proj, relative_position_bias_table and the
relative_position_index buffer; norm2; mlp: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout);
``features.2/4/6`` PatchMerging (reduction without bias, norm); then norm, avgpool, head. A
torchvision ``swin_t`` state_dict loads into ``swin_t()`` (strict). Written from the architecture
(Liu et al. 2021) and torchvision's key layout, not copied.

Activation sites: one GELU per block (12 in Swin-T, as in the EGP paper). Tensors are channel-last
(N, H, W, C) inside the stages, so the MLP Linears export as MatMul on 4-D activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_deploy.archs.registry import register_arch


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _relative_position_index(window: int) -> torch.Tensor:
    """For every (query, key) pair of a window, the row of the bias table holding their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2), offsets >= 0
    return (rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]).flatten()


class ShiftedWindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, shift: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise TypeError(f"width {dim} is not a multiple of the head count {heads}")
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _position_bias(self) -> torch.Tensor:
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, n, n)

    def _shift_mask(self, hp: int, wp: int, sh: int, sw: int, device) -> torch.Tensor:
        """-100 between tokens that the cyclic shift brought into one window from different regions."""
        w = self.window
        region = torch.zeros(hp, wp, device=device)
        bounds = ((0, hp - w), (hp - w, hp - sh), (hp - sh, hp))
        bounds_w = ((0, wp - w), (wp - w, wp - sw), (wp - sw, wp))
        label = 0
        for h0, h1 in bounds:
            for w0, w1 in bounds_w:
                region[h0:h1, w0:w1] = label
                label += 1
        region = region.view(hp // w, w, wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)  # (windows, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        win = self.window
        pad_r, pad_b = (win - w_ % win) % win, (win - h % win) % win
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w_ + pad_r
        # a window covering the whole map (along an axis) needs no shift there
        sh, sw = (0 if win >= hp else self.shift), (0 if win >= wp else self.shift)
        shift = sh + sw > 0
        if shift:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nw = (hp // win) * (wp // win)
        x = x.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, win * win, c)
        n, d = win * win, c // self.heads
        qkv = self.qkv(x).reshape(b * nw, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
        attn = q.matmul(k.transpose(-2, -1)) + self._position_bias()
        if shift:
            mask = self._shift_mask(hp, wp, sh, sw, x.device)
            attn = attn.view(b, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(b * nw, n, c)
        x = self.proj(x)
        x = x.view(b, hp // win, wp // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shift:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w_, :].contiguous()


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.stochastic_depth = nn.Identity()  # inference only: stochastic depth is the identity
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (4C), normalised, projected to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3], x.shape[-2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    def __init__(self, patch_size: int = 4, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if len(depths) != len(heads):
            raise TypeError(f"depths {tuple(depths)} and heads {tuple(heads)} differ in length")
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, patch_size, patch_size), Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim))]
        for stage, (depth, nh) in enumerate(zip(depths, heads)):
            dim = embed_dim * 2 ** stage
            layers.append(nn.Sequential(*(
                SwinTransformerBlock(dim, nh, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, dropout)
                for i in range(depth))))
            if stage < len(depths) - 1:
                layers.append(PatchMerging(dim))
        self.features = nn.Sequential(*layers)
        features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(features)
        self.permute = Permute([0, 3, 1, 2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.avgpool(self.permute(self.norm(self.features(x))))))


@register_arch
def swin_t(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
           width: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2), heads: tuple[int, ...] = (3, 6, 12, 24),
           window_size: int = 7, mlp_ratio: float = 4.0) -> SwinTransformer:
    """Swin-T (torchvision's ``swin_t`` at its defaults but ``num_classes``/``in_channels``; 224x224 in
    torchvision, any size here). ``width`` is the embedding dim; ``depths``/``heads`` per stage."""
    if image_size % patch_size:
        raise TypeError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return SwinTransformer(patch_size, width, tuple(depths), tuple(heads), window_size, mlp_ratio, num_classes,
                           in_channels)
