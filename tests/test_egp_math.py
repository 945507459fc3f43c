"""The mathematics EGP.md pins down: entropy of known ON probabilities, the water-filling budget."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from egp_deploy.prune.allocation import LayerState, allocate
from egp_deploy.prune.entropy import measure_entropy


def _stats(x: torch.Tensor, act: nn.Module):
    model = nn.Sequential(nn.Identity(), act)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=3)
    return measure_entropy(model, loader)["1"]


def test_entropy_of_known_on_probabilities():
    # 8 samples x 3 channels (N, C): channel 0 ON 2/8 = 25 %, channel 1 always ON, channel 2 always
    # OFF with exact zeros (zeros count as OFF)
    x = torch.zeros(8, 3)
    x[:2, 0], x[2:, 0] = 1.0, -1.0
    x[:, 1] = torch.arange(1, 9).float()
    x[:4, 2] = 0.0
    x[4:, 2] = -3.0
    s = _stats(x, nn.ReLU())
    h025 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.8113 bits
    assert s.p_on.tolist() == pytest.approx([0.25, 1.0, 0.0])
    assert s.channel_entropy.tolist() == pytest.approx([h025, 0.0, 0.0])
    # layer entropy: mean over non-degenerate channels only (channel 0)
    assert s.entropy == pytest.approx(h025)
    assert s.always_on.tolist() == [False, True, False]
    assert s.always_off.tolist() == [False, False, True]


def test_layer_entropy_is_zero_when_every_channel_is_degenerate():
    x = torch.cat([torch.ones(5, 1), -torch.ones(5, 1)], dim=1)
    s = _stats(x, nn.ReLU())
    assert s.entropy == 0.0 and s.zero_entropy


def test_relu6_three_regions_and_conv_channels():
    # NCHW: channel 0 half OFF half linear (1 bit), channel 1 always saturated (constant 6)
    x = torch.zeros(2, 2, 2, 2)
    x[:, 0, 0, :] = -1.0
    x[:, 0, 1, :] = 3.0
    x[:, 1] = 7.0
    s = _stats(x, nn.ReLU6())
    assert s.counts.tolist() == [[4, 4, 0], [0, 0, 8]]
    assert s.channel_entropy.tolist() == pytest.approx([1.0, 0.0])
    assert s.always_sat.tolist() == [False, True]
    assert not s.always_on.any()


def test_tokens_use_the_last_dim_as_neurons():
    x = torch.randn(4, 5, 3).abs()  # (N, L, C), all ON
    x[..., 2] = -x[..., 2]  # channel 2 all OFF
    s = _stats(x, nn.GELU())
    assert s.channels == 3 and s.proxy
    assert s.always_on.tolist() == [True, True, False]


def test_allocation_against_hand_computation():
    # A: I = H * mean|w| = 1.0 * 0.1 = 0.1 ; B: 1.0 * 0.2 = 0.2 ; C: 0.01 * 0.1 = 0.001 ; D: H = 0 (frozen)
    layers = [
        LayerState("A", 1.0, 0.1, 100),
        LayerState("B", 1.0, 0.2, 100),
        LayerState("C", 0.01, 0.1, 10),
        LayerState("D", 0.0, 0.3, 50),
    ]
    a = allocate(layers, rate=0.5)
    # B = 0.5 * (100 + 100 + 10) = 105; S = 0.301; S / I = (3.01, 1.505, 301): C takes ~all of 105 >= 10
    # -> C is pruned to 100 %, B -> 105 - 10 = 95, S -> 0.3
    # second round: S / I = (3, 1.5); a_A = 1 / (1 + e^-1.5) = 0.81757, a_B = 0.18243
    # n_A = 95 * 0.81757 = 77.67 -> 78 ; n_B = 95 * 0.18243 = 17.33 -> 17
    assert a.budget == 105
    assert a.full == ["C"]
    assert a.frozen == ["D"]
    assert a.prune == {"A": 78, "B": 17, "C": 10, "D": 0}
    assert a.shares["A"] == pytest.approx(0.81757, abs=1e-5)


def test_allocation_surplus_cascades_to_a_second_full_layer():
    # X (I = 0.001, 10 weights) and Y (I = 0.002, 10 weights) are tiny and irrelevant; Z is big.
    # B = 0.5 * 220 = 110; X saturates first, then with B = 100, S = 0.102: S/I = (51, 1.02) -> Y
    # takes ~all 100 >= 10 -> full; Z gets the remaining 90.
    layers = [LayerState("X", 0.01, 0.1, 10), LayerState("Y", 0.02, 0.1, 10), LayerState("Z", 1.0, 0.1, 200)]
    a = allocate(layers, rate=0.5)
    assert sorted(a.full) == ["X", "Y"]
    assert a.prune == {"X": 10, "Y": 10, "Z": 90}


def test_allocation_rejects_bad_rates():
    with pytest.raises(ValueError):
        allocate([LayerState("A", 1.0, 0.1, 10)], rate=0.0)
