"""Pruning masks, in the spirit of torch.nn.utils.prune but as plain data.

Masks are bool tensors in a dict ``{param_name: mask}`` (True = weight kept). They are folded
into the weights (pruned weights are exact zeros), so a saved state_dict needs no mask buffers
and ``masks_from_zeros`` recovers them from a checkpoint. ``enforce_masks`` zeroes masked
weights, their gradients and optimizer state (momentum), so they stay zero through fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Masks = dict[str, torch.Tensor]


def weight_param(layer: str) -> str:
    return f"{layer}.weight"


def masks_from_zeros(model: nn.Module, layers: list[str]) -> Masks:
    """Masks of the given conv/linear layers: True where the weight is nonzero."""
    params = dict(model.named_parameters())
    return {weight_param(n): params[weight_param(n)].detach() != 0 for n in layers}


def full_masks(model: nn.Module, layers: list[str]) -> Masks:
    params = dict(model.named_parameters())
    return {weight_param(n): torch.ones_like(params[weight_param(n)], dtype=torch.bool) for n in layers}


def smallest(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` smallest entries of a 1-D tensor, ties broken by position (lower index
    first): what the first ``n`` of a stable sort select, found with one O(N) k-th value search
    instead of a full sort (a 25 M-weight step is dominated by it)."""
    n = max(0, min(int(n), values.numel()))
    out = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if n == 0:
        return out
    if n == values.numel():
        return ~out
    threshold = torch.kthvalue(values, n).values  # the n-th smallest value
    below = values < threshold
    out |= below
    ties = (values == threshold).nonzero().squeeze(1)
    out[ties[: n - int(below.sum())]] = True
    return out


def prune_smallest(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """A new mask with ``n`` more of the kept weights removed, smallest |w| first (L1, unstructured).

    Ties are broken by flat index, so the result is deterministic."""
    kept = mask.flatten().nonzero().squeeze(1)
    new = mask.clone().flatten()
    if int(n) > 0 and kept.numel():
        mags = torch.masked_select(weight.detach().flatten(), mask.flatten()).abs()  # = w[kept], ~3x faster
        new[kept[smallest(mags, n)]] = False
    return new.view_as(mask)


def prune_global_smallest(params: dict[str, torch.Tensor], masks: Masks, n: int) -> Masks:
    """Global L1: remove the ``n`` smallest kept weights over all masked parameters (IMP)."""
    names = list(masks)
    mags = torch.cat([torch.masked_select(params[k].detach().flatten(), masks[k].flatten()).abs() for k in names])
    n = max(0, min(int(n), mags.numel()))
    if n == 0:
        return {k: m.clone() for k, m in masks.items()}
    threshold_rank = smallest(mags, n)  # exactly n, ties resolved by position
    out, start = {}, 0
    for k in names:
        m = masks[k].flatten().clone()
        kept = m.nonzero().squeeze(1)
        drop = threshold_rank[start : start + kept.numel()]
        m[kept[drop]] = False
        start += kept.numel()
        out[k] = m.view_as(masks[k])
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the masked weights in place (fold the masks into the weights)."""
    params = dict(model.named_parameters())
    for k, m in masks.items():
        params[k].mul_(m.to(params[k].dtype))


@torch.no_grad()
def enforce_masks(model: nn.Module, masks: Masks, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero masked weights, their gradients and every same-shaped optimizer state (momentum...)."""
    params = dict(model.named_parameters())
    for k, m in masks.items():
        p = params[k]
        keep = m.to(p.dtype)
        p.mul_(keep)
        if p.grad is not None:
            p.grad.mul_(keep)
        if optimizer is not None:
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.mul_(keep)


def mask_gradients(model: nn.Module, masks: Masks) -> list:
    """Gradient hooks so masked weights get zero gradient (weight decay then adds w * 0 = 0)."""
    params = dict(model.named_parameters())
    return [params[k].register_hook(lambda g, m=m: g * m.to(g.dtype)) for k, m in masks.items()]


def sparsity(model: nn.Module, layers: list[str]) -> float:
    """Fraction of exact-zero weights over the weight tensors of ``layers``."""
    params = dict(model.named_parameters())
    total = zeros = 0
    for n in layers:
        w = params[weight_param(n)]
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def all_zero_layers(model: nn.Module, layers: list[str]) -> list[str]:
    params = dict(model.named_parameters())
    return [n for n in layers if not bool(params[weight_param(n)].any())]


def zero_output_channels(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Per layer: how many output channels (dim 0 of the weight) are entirely zero."""
    params = dict(model.named_parameters())
    out = {}
    for n in layers:
        w = params[weight_param(n)]
        out[n] = int((w.flatten(1) == 0).all(dim=1).sum())
    return out
