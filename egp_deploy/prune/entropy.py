"""Activation entropy per channel and per layer (EGP.md, "Entropy, exactly").

Two separate steps so a distributed run can all-reduce in between:
    counts = collect_counts(model, loader)        # plain int64 tensors, summable across ranks
    stats  = stats_from_counts(counts, sites)     # counts -> p_on, entropies, always-ON/OFF
``measure_entropy`` does both.

Regions per channel (exact zeros are OFF, as in the official code):
    relu / gelu / silu (proxy)   off: x <= 0      on: x > 0
    leaky_relu / prelu           neg: x <= 0      on: x > 0         (two linear pieces)
    relu6                        off: x <= 0      on: 0 < x < 6     sat: x >= 6
Channel entropy is the Shannon entropy (bits) of the channel's region distribution: the binary
entropy of p_on for two-region sites; for ReLU6 the three-region entropy, so it is zero exactly
when a channel stays in ONE region (only always-linear is an identity; always-OFF and
always-saturated are constants). Layer entropy is the mean over non-degenerate channels, 0 if
there are none. Default p is data-set level (batch-size independent); ``mode="batch"`` averages
per-batch layer entropies as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from egp_deploy.errors import NonFiniteError, UnsupportedError
from egp_deploy.numeric import region_entropy_bits
from egp_deploy.prune.sites import PROXY_KINDS, Discovery, Site, discover_sites, find_sites

REGIONS = {
    "relu": ("off", "on"), "gelu": ("off", "on"), "silu": ("off", "on"),
    "leaky_relu": ("neg", "on"), "prelu": ("neg", "on"), "relu6": ("off", "on", "sat"),
}


def channel_dim(ndim: int, axis: int | None = None) -> int:
    """A neuron is a channel: ``axis`` when the site's feeder tells it (1 after a conv, -1 after a
    Linear: channel-last (N, H, W, C) maps included); otherwise dim 1 of (N, C, ...) and (N, C) and
    the last dim of (N, L, C) tokens."""
    if axis is not None and ndim > 1:
        return axis
    return -1 if ndim == 3 else 1


def _per_channel_count(flags: torch.Tensor, cdim: int) -> torch.Tensor:
    """True entries per channel of a bool tensor, as int64 (C,).

    Summing the contiguous positions of each (sample, channel) first and then the samples is ~2x
    faster than one reduction over dims (0, 2, 3) of an NCHW tensor; int32 accumulation is ~2x
    faster than the default int64 bool sum, and one batch cannot overflow it."""
    if cdim == flags.ndim - 1:  # (N, C) and (N, L, C): channel last
        per = flags.reshape(-1, flags.shape[-1]).sum(0, dtype=torch.int32)
    else:  # (N, C, *spatial)
        per = flags.reshape(flags.shape[0], flags.shape[1], -1).sum(-1, dtype=torch.int32).sum(0, dtype=torch.int32)
    return per.long()


def region_counts(x: torch.Tensor, kind: str, axis: int | None = None) -> torch.Tensor:
    """Per-channel region counts of one pre-activation tensor: int64 (C, R), R = len(REGIONS[kind]);
    ``axis``: the channel dim when known (see channel_dim)."""
    cdim = channel_dim(x.ndim, axis) % x.ndim
    total = x.numel() // x.shape[cdim]
    on_or_above = _per_channel_count(x > 0, cdim)
    if kind == "relu6":
        sat = _per_channel_count(x >= 6, cdim)
        return torch.stack([total - on_or_above, on_or_above - sat, sat], dim=1)
    return torch.stack([total - on_or_above, on_or_above], dim=1)


def _entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (bits) of each row of a (C, R) count table (egp_deploy.numeric, shared with
    the surgery's ONNX-level statistics); 0 for empty rows."""
    h = region_entropy_bits(counts.detach().cpu().numpy())
    return torch.from_numpy(h).to(counts.device)


def _layer_entropy(channel_h: torch.Tensor, degenerate: torch.Tensor) -> float:
    live = ~degenerate
    return float(channel_h[live].mean()) if bool(live.any()) else 0.0


@dataclass
class SiteCounts:
    """What is collected per site: summable across data shards and ranks."""

    kind: str
    counts: torch.Tensor  # int64 (C, R): samples x positions per channel and region
    batch_entropy_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    batches: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def add_(self, other: "SiteCounts") -> "SiteCounts":
        self.counts += other.counts
        self.batch_entropy_sum += other.batch_entropy_sum
        self.batches += other.batches
        return self


@dataclass
class SiteStats:
    name: str
    kind: str
    proxy: bool
    regions: tuple[str, ...]
    counts: torch.Tensor  # int64 (C, R)
    p_on: torch.Tensor  # float64 (C,): P(0 < x [< 6])
    channel_entropy: torch.Tensor  # float64 (C,) bits
    entropy: float  # layer entropy (bits)
    always_on: torch.Tensor  # bool (C,): always in the "on" (linear) region
    always_off: torch.Tensor  # bool (C,): always x <= 0
    always_sat: torch.Tensor  # bool (C,): always x >= 6 (ReLU6 only; all False otherwise)
    feeder: str | None = None
    mode: str = "dataset"

    @property
    def channels(self) -> int:
        return int(self.counts.shape[0])

    @property
    def degenerate(self) -> torch.Tensor:
        """Channels that stay in one region (zero entropy)."""
        return (self.counts > 0).sum(dim=1) <= 1

    @property
    def zero_entropy(self) -> bool:
        return self.entropy == 0.0

    def summary(self) -> dict:
        return {
            "kind": self.kind, "proxy": self.proxy, "feeder": self.feeder, "channels": self.channels,
            "entropy": self.entropy, "always_on": int(self.always_on.sum()),
            "always_off": int(self.always_off.sum()), "always_sat": int(self.always_sat.sum()),
        }


def _sites_of(model: nn.Module, sites: list[Site] | None) -> list[Site]:
    return find_sites(model) if sites is None else sites


_RECORDERS: list = []  # the recorder of the probe pass in progress (innermost last)


def _probe(x: torch.Tensor, index: int) -> torch.Tensor:
    """Inserted before a site in a probe graph: hands the pre-activation to the active recorder."""
    _RECORDERS[-1](index, x)
    return x


def _probe_module(model: nn.Module, found: Discovery, sites: list[Site]) -> nn.Module:
    """A GraphModule over ``model``'s own submodules and parameters (so it sees the current weights)
    running the discovery's fx graph with ``_probe(x, i)`` before the i-th of ``sites``."""
    import copy

    import torch.fx as fx

    graph = fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(found.graph, env))
    graph._codegen = copy.deepcopy(found.graph._codegen)
    by_name = {n.name: n for n in found.graph.nodes}
    for i, s in enumerate(sites):
        node = env[by_name[found.node_of[s.name]]]
        with graph.inserting_before(node):
            node.update_arg(0, graph.call_function(_probe, (node.args[0], i)))
    return fx.GraphModule(model, graph)


def _instrument(model: nn.Module, sites: list[Site], found: Discovery | None, record) -> tuple[nn.Module, list]:
    """What to run and the hooks to remove. Module sites only: the model itself, a forward pre-hook
    per activation module that tells its calls apart by their order within one forward pass (a
    module called twice is two sites); a root pre-hook starts each pass's count afresh. With
    functional sites: a probe graph. ``record(i, pre_activation)`` receives the i-th site's input."""
    probe = found if found is not None else Discovery(sites, "given")
    if not probe.needs_graph:
        modules = dict(model.named_modules())
        index = {(s.module, s.call): i for i, s in enumerate(sites)}
        calls: dict[str, int] = {}

        def hook_for(name: str):
            def hook(_mod, args):
                k = calls.get(name, 0)
                calls[name] = k + 1
                i = index.get((name, k))
                if i is not None:
                    record(i, args[0])
            return hook

        handles = [model.register_forward_pre_hook(lambda *_: calls.clear())]
        return model, handles + [modules[name].register_forward_pre_hook(hook_for(name))
                                 for name in dict.fromkeys(s.module for s in sites)]
    if found is None or found.graph is None:
        found = discover_sites(model)
    if found.graph is None or any(s.name not in found.node_of for s in sites):
        raise UnsupportedError(f"functional activation sites of {type(model).__name__} can only be measured on a "
                               f"torch.fx graph, and fx cannot trace it ({found.note})")
    return _probe_module(model, found, sites), []


def _all_finite(output) -> bool:
    """Every floating tensor in a model's output (a tensor, tuple, dict ...) is finite."""
    from torch.utils._pytree import tree_leaves

    return all(bool(torch.isfinite(t).all()) for t in tree_leaves(output)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def collect_counts(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", max_batches: int | None = None,
    sites: list[Site] | Discovery | None = None, per_batch: bool = False,
) -> dict[str, SiteCounts]:
    """One eval-mode, no-grad pass over ``loader`` (tensors, or tuples/lists whose first item is the
    input); each site's input (the pre-activation) is counted per channel and region."""
    found = sites if isinstance(sites, Discovery) else None
    site_list = found.sites if found is not None else _sites_of(model, sites)
    out: dict[str, SiteCounts] = {}

    def record(i: int, x: torch.Tensor) -> None:
        site = site_list[i]
        c = region_counts(x.detach(), site.kind, site.channel_axis)
        prev = out.get(site.name)
        if prev is None:
            prev = out[site.name] = SiteCounts(site.kind, torch.zeros_like(c))
        prev.counts += c
        if per_batch:
            h = _entropy_bits(c)
            prev.batch_entropy_sum += _layer_entropy(h, (c > 0).sum(dim=1) <= 1)
            prev.batches += 1

    runner, handles = _instrument(model, site_list, found, record)
    was_training = model.training
    model.eval()
    _RECORDERS.append(record)
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                y = runner(x.to(device))
                if not _all_finite(y):
                    if x.is_floating_point() and not torch.isfinite(x).all():
                        raise NonFiniteError("calibration data contains NaN/Inf values")
                    raise NonFiniteError("model outputs NaN/Inf during entropy measurement")
    finally:
        _RECORDERS.pop()
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def stats_from_counts(
    counts: dict[str, SiteCounts], sites: list[Site] | None = None, mode: str = "dataset",
) -> dict[str, SiteStats]:
    """Counts -> per-channel p_on and entropy, layer entropy, always-ON/OFF masks."""
    if mode not in ("dataset", "batch"):
        raise ValueError(f"entropy mode must be 'dataset' or 'batch', got {mode!r}")
    feeders = {s.name: s.feeder for s in (sites or [])}
    stats: dict[str, SiteStats] = {}
    for name, sc in counts.items():
        c = sc.counts
        total = c.sum(dim=1).clamp_min(1)
        regions = REGIONS[sc.kind]
        on = regions.index("on")
        h = _entropy_bits(c)
        degenerate = (c > 0).sum(dim=1) <= 1
        if mode == "batch":
            if int(sc.batches) == 0:
                raise ValueError("per-batch entropy needs counts collected with per_batch=True")
            layer_h = float(sc.batch_entropy_sum / sc.batches)
        else:
            layer_h = _layer_entropy(h, degenerate)
        full = c.sum(dim=1)
        stats[name] = SiteStats(
            name=name, kind=sc.kind, proxy=sc.kind in PROXY_KINDS, regions=regions, counts=c,
            p_on=c[:, on].double() / total, channel_entropy=h, entropy=layer_h,
            always_on=c[:, on] == full, always_off=c[:, 0] == full,
            always_sat=(c[:, 2] == full) if sc.kind == "relu6" else torch.zeros_like(degenerate),
            feeder=feeders.get(name), mode=mode,
        )
    return stats


def measure_entropy(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", max_batches: int | None = None,
    mode: str = "dataset", sites: list[Site] | Discovery | None = None,
) -> dict[str, SiteStats]:
    """Entropy of every activation site of ``model`` over ``loader`` (eval mode, no grad)."""
    sites = discover_sites(model) if sites is None else sites
    counts = collect_counts(model, loader, device, max_batches, sites, per_batch=(mode == "batch"))
    return stats_from_counts(counts, sites.sites if isinstance(sites, Discovery) else sites, mode)


def layer_entropies(stats: dict[str, SiteStats]) -> dict[str, float]:
    return {k: v.entropy for k, v in stats.items()}


def zero_entropy_sites(stats: dict[str, SiteStats]) -> list[str]:
    return [k for k, v in stats.items() if v.zero_entropy]
