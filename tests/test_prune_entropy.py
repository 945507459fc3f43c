"""Entropy measurement (egp_deploy/prune/entropy.py) and site discovery (sites.py).

Every expected entropy is computed in the test from the binary/Shannon entropy formula on ON
probabilities that the hand-made activations have by construction.
(tests/test_egp_math.py covers an (N, C) tensor with ReLU; here: NCHW through a real conv with
an in-place ReLU, token tensors, ReLU6 three regions, per-batch mode, sharded counts.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from egp_deploy.archs import create_model
from egp_deploy.errors import NonFiniteError
from egp_deploy.prune.entropy import collect_counts, measure_entropy, stats_from_counts
from egp_deploy.prune.sites import all_weight_layers, find_sites, prunable_layers


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def shannon(ps: list[float]) -> float:
    return -sum(p * math.log2(p) for p in ps if p > 0)


def loader_of(x: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch_size)


class IdentityConvThenReLU(nn.Module):
    """A 1x1 conv with identity weights (so the pre-activation IS the input) and an in-place ReLU."""

    def __init__(self, channels: int, inplace: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.act(self.conv(x))


def known_nchw() -> torch.Tensor:
    """(N=4, C=3, H=2, W=2): channel 0 ON in 4 of 16 positions (25 %), channel 1 always ON,
    channel 2 always OFF, half of it exact zeros."""
    x = torch.empty(4, 3, 2, 2)
    x[:, 0] = -0.5
    x[0, 0] = 2.0  # one whole sample (4 positions) ON: 4/16 = 25 %
    x[:, 1] = torch.linspace(0.1, 3.0, 16).view(4, 2, 2)
    x[:, 2] = -1.0
    x[:2, 2] = 0.0  # exact zeros are OFF
    return x


@pytest.mark.parametrize("inplace", [True, False])
def test_known_on_probabilities_nchw_through_conv_and_inplace_relu(inplace):
    model = IdentityConvThenReLU(3, inplace=inplace)
    stats = measure_entropy(model, loader_of(known_nchw(), batch_size=3))
    assert list(stats) == ["act"]
    s = stats["act"]
    assert s.feeder == "conv" and s.kind == "relu" and not s.proxy
    assert s.counts.tolist() == [[12, 4], [0, 16], [16, 0]]  # (OFF, ON) per channel
    assert s.p_on.tolist() == pytest.approx([0.25, 1.0, 0.0])
    assert h2(0.25) == pytest.approx(0.8113, abs=1e-4)
    assert s.channel_entropy.tolist() == pytest.approx([h2(0.25), 0.0, 0.0])
    # layer entropy = mean over the NON-degenerate channels only: channel 0 alone
    assert s.entropy == pytest.approx(h2(0.25))
    assert s.degenerate.tolist() == [False, True, True]
    assert s.always_on.tolist() == [False, True, False] and s.always_off.tolist() == [False, False, True]
    assert s.summary()["always_on"] == 1 and s.summary()["always_off"] == 1


def test_layer_entropy_mean_of_live_channels_and_zero_when_none():
    # (N, C) with C = 4: p = 1/2, 1/4, always ON, always OFF -> mean of h2(1/2) = 1 and h2(1/4)
    x = torch.full((8, 4), -1.0)
    x[:4, 0] = 1.0
    x[:2, 1] = 1.0
    x[:, 2] = 5.0
    s = measure_entropy(nn.Sequential(nn.Identity(), nn.ReLU()), loader_of(x))["1"]
    assert s.entropy == pytest.approx((h2(0.5) + h2(0.25)) / 2)
    none_live = torch.cat([torch.ones(8, 2), torch.zeros(8, 2)], dim=1)  # ON, ON, OFF(0), OFF(0)
    z = measure_entropy(nn.Sequential(nn.Identity(), nn.ReLU()), loader_of(none_live))["1"]
    assert z.entropy == 0.0 and z.zero_entropy and z.always_on.sum() == 2 and z.always_off.sum() == 2


def test_relu6_three_regions():
    # (N=8, C=4): ch0 OFF/linear/saturated 2/4/2 -> H = shannon(1/4, 1/2, 1/4) = 1.5 bits;
    # ch1 always linear (the only removable state); ch2 always saturated (x >= 6, 6 itself included);
    # ch3 always OFF
    x = torch.empty(8, 4)
    x[:, 0] = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0, 5.9, 6.0, 9.0])
    x[:, 1] = torch.linspace(0.5, 5.5, 8)
    x[:, 2] = torch.tensor([6.0, 7, 8, 9, 10, 11, 12, 6.0])
    x[:, 3] = -2.0
    s = measure_entropy(nn.Sequential(nn.Identity(), nn.ReLU6()), loader_of(x))["1"]
    assert s.regions == ("off", "on", "sat")
    assert s.counts.tolist() == [[2, 4, 2], [0, 8, 0], [0, 0, 8], [8, 0, 0]]
    assert s.channel_entropy.tolist() == pytest.approx([shannon([0.25, 0.5, 0.25]), 0, 0, 0])
    assert shannon([0.25, 0.5, 0.25]) == pytest.approx(1.5)
    assert s.entropy == pytest.approx(1.5)  # only channel 0 is live
    assert s.always_on.tolist() == [False, True, False, False]
    assert s.always_sat.tolist() == [False, False, True, False]
    assert s.always_off.tolist() == [False, False, False, True]
    # Hardtanh(0, 6) is the same site kind; a general Hardtanh is not a site
    assert [t.kind for t in find_sites(nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(0.0, 6.0)))] == ["relu6"]
    assert find_sites(nn.Sequential(nn.Linear(2, 2), nn.Hardtanh(-1.0, 1.0))) == []


def test_leaky_relu_regions_are_negative_and_positive():
    x = torch.tensor([[-3.0, 1.0], [0.0, 2.0], [4.0, 3.0], [5.0, 4.0]])
    s = measure_entropy(nn.Sequential(nn.Identity(), nn.LeakyReLU(0.1)), loader_of(x))["1"]
    assert s.regions == ("neg", "on") and s.kind == "leaky_relu" and not s.proxy
    assert s.p_on.tolist() == pytest.approx([0.5, 1.0])
    assert s.entropy == pytest.approx(1.0)


def test_token_tensors_use_the_last_dim():
    # (N=2, L=5, C=3): ON probability per channel differs along C, and L != C so using the wrong
    # dim would give the wrong number of neurons. ch0 ON at 1 of 5 tokens (20 %), ch1 at 3 of 5
    # (60 %), ch2 always ON.
    x = -torch.ones(2, 5, 3)
    x[:, 0, 0] = 1.0
    x[:, :3, 1] = 1.0
    x[:, :, 2] = 1.0
    for act, proxy in ((nn.GELU(), True), (nn.SiLU(), True), (nn.ReLU(), False)):
        s = measure_entropy(nn.Sequential(nn.Identity(), act), loader_of(x, 1))["1"]
        assert s.channels == 3 and s.proxy is proxy
        assert s.p_on.tolist() == pytest.approx([0.2, 0.6, 1.0])
        assert s.entropy == pytest.approx((h2(0.2) + h2(0.6)) / 2)


def test_counts_of_two_halves_sum_to_the_whole():
    """What a distributed run relies on: per-rank counts all-reduced equal a single pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.ReLU6())
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
    x = torch.randn(22, 2, 6, 6) * 3
    whole = collect_counts(model, loader_of(x, 5), per_batch=True)
    first = collect_counts(model, loader_of(x[:9], 5), per_batch=True)
    second = collect_counts(model, loader_of(x[9:], 5), per_batch=True)
    for name in whole:
        summed = first[name].add_(second[name])
        assert torch.equal(summed.counts, whole[name].counts), name
        assert summed.counts.dtype == torch.int64
    a, b = stats_from_counts(whole), stats_from_counts(first)
    for name in a:
        assert a[name].entropy == b[name].entropy
        assert torch.equal(a[name].channel_entropy, b[name].channel_entropy)
    assert 0 < a["2"].entropy < 1 and 0 < a["4"].entropy < math.log2(3)  # the toy is not degenerate


def test_dataset_mode_is_batch_size_independent_batch_mode_averages_batches():
    # batch 1: half ON (1 bit); batch 2: all ON (0 bit, degenerate -> layer entropy 0)
    x = torch.cat([torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [2.0]])])
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    per_batch = measure_entropy(model, loader_of(x, 2), mode="batch")["1"]
    assert per_batch.entropy == pytest.approx((1.0 + 0.0) / 2)
    assert per_batch.mode == "batch"
    for bs in (1, 2, 3, 4):  # data-set level p = 3/4 whatever the batch size
        assert measure_entropy(model, loader_of(x, bs))["1"].entropy == pytest.approx(h2(0.75))
    with pytest.raises(ValueError, match="per_batch=True"):
        stats_from_counts(collect_counts(model, loader_of(x, 2)), mode="batch")
    with pytest.raises(ValueError, match="mode"):
        stats_from_counts(collect_counts(model, loader_of(x, 2)), mode="median")


def test_measurement_restores_mode_removes_hooks_and_honours_max_batches():
    model = IdentityConvThenReLU(3)
    model.train()
    x = known_nchw()
    s = measure_entropy(model, loader_of(x, 1), max_batches=1)["act"]
    assert int(s.counts.sum(dim=1)[0]) == 4  # only the first sample (4 positions)
    assert model.training
    assert not model.act._forward_pre_hooks


def test_non_finite_model_output_raises():
    x = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(NonFiniteError):
        measure_entropy(nn.Sequential(nn.Identity(), nn.ReLU()), loader_of(x))


# ---- site discovery on the reference architectures -------------------------------------------


def test_resnet18_sites_and_feeders():
    model = create_model("resnet18", width=4, num_classes=10, in_channels=1)
    sites = find_sites(model)
    assert len(sites) == 17 and all(s.kind == "relu" for s in sites)
    by_name = {s.name: s for s in sites}
    assert by_name["relu"].feeder == "conv1"
    for stage in range(1, 5):
        for block in range(2):
            pre = f"layer{stage}.{block}"
            assert by_name[f"{pre}.relu1"].feeder == f"{pre}.conv1" and not by_name[f"{pre}.relu1"].post_add
            # after the residual add: the last conv of the branch, not the downsample
            assert by_name[f"{pre}.relu2"].feeder == f"{pre}.conv2" and by_name[f"{pre}.relu2"].post_add
    layers = prunable_layers(model, sites)
    assert len(layers) == 17
    assert not any("downsample" in n for n in layers) and "fc" not in layers
    excluded = set(all_weight_layers(model)) - set(layers)
    assert excluded == {"fc", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}


def test_mobilenet_v2_sites():
    model = create_model("mobilenet_v2", width_mult=0.25, num_classes=10, in_channels=1)
    sites = find_sites(model)
    assert len(sites) == 35 and all(s.kind == "relu6" for s in sites)
    layers = prunable_layers(model, sites)
    assert len(layers) == 35 and "classifier.1" not in layers
    # the projection conv of each inverted residual feeds no activation (linear bottleneck)
    weighted = dict(model.named_modules())
    assert all(isinstance(weighted[n], nn.Conv2d) for n in layers)


def test_vgg16_bn_sites():
    model = create_model("vgg16_bn", width=4, num_classes=10, in_channels=1)
    sites = find_sites(model)
    assert len(sites) == 15
    layers = prunable_layers(model, sites)
    last = all_weight_layers(model)[-1]
    assert len(layers) == 15 and last not in layers  # the classifier's last linear is never pruned


def test_vit_tiny_gelu_sites_never_attention_or_second_mlp_linear():
    model = create_model("vit_tiny", width=16, layers=3, num_classes=10, in_channels=1)
    sites = find_sites(model)
    assert len(sites) == 3 and all(s.kind == "gelu" and s.proxy for s in sites)
    layers = prunable_layers(model, sites)
    assert layers == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(3)]
    for i in range(3):
        blk = f"encoder.layers.encoder_layer_{i}"
        assert f"{blk}.mlp.3" not in layers and f"{blk}.self_attention.out_proj" not in layers
    assert "heads.head" not in layers and "conv_proj" not in layers
    # and the GELU entropy is measured on token tensors: one neuron per MLP hidden channel
    x = torch.randn(3, 1, 32, 32)
    stats = measure_entropy(model, loader_of(x, 3), sites=sites)
    assert all(stats[s.name].channels == 32 for s in sites)  # mlp_dim = 2 x width


def test_untraceable_model_falls_back_to_registration_order():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU6()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.act2(self.fc2(self.act1(self.fc1(x))))

    sites = find_sites(Branchy())
    assert [(s.name, s.kind, s.feeder) for s in sites] == [("act1", "relu", "fc1"), ("act2", "relu6", "fc2")]
