"""EGP's water-filling budget allocation (egp_deploy/prune/allocation.py) against hand arithmetic.

EGP.md:  I_l = H_l * mean|w_l|;  S = sum I_l;  B = r * nonzero weights of the live layers;
         repeat: a_l = softmax(S / I_l), n_l = B a_l; a layer with n_l >= its remaining weights
         goes to 100 %, leaves the pool, B -= its weights, S -= its I_l.
(tests/test_egp_math.py has a second toy; this one also checks the softmax shares, frozen
layers of both kinds, and invariants on random layer sets.)
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egp_deploy.errors import UsageError
from egp_deploy.prune.allocation import LayerState, allocate
from egp_deploy.prune.loop import PruneConfig


def toy() -> list[LayerState]:
    return [
        LayerState("big", entropy=1.0, mean_abs=0.5, remaining=1000),  # I = 0.5
        LayerState("mid", entropy=0.5, mean_abs=0.4, remaining=400),  # I = 0.2
        LayerState("tiny", entropy=0.1, mean_abs=0.1, remaining=40),  # I = 0.01
        LayerState("dead", entropy=0.0, mean_abs=0.3, remaining=100),  # H = 0: frozen
        LayerState("empty", entropy=0.7, mean_abs=0.0, remaining=0),  # nothing left: frozen
    ]


def test_rate_quarter_one_layer_to_100_percent_surplus_redistributed():
    a = allocate(toy(), rate=0.25)
    # B = 0.25 * (1000 + 400 + 40) = 360   (frozen layers' weights do not count)
    assert a.budget == 360
    # round 1: S = 0.5 + 0.2 + 0.01 = 0.71; S / I = 1.42 (big), 3.55 (mid), 71 (tiny)
    #   a_tiny = 1 / (1 + e^(1.42 - 71) + e^(3.55 - 71)) = 1 - 2e-30 -> n_tiny = 360 >= 40: tiny -> 100 %
    # round 2: B = 360 - 40 = 320, S = 0.7; S / I = 1.4 (big), 3.5 (mid)
    #   a_mid = 1 / (1 + e^-(3.5 - 1.4)) = 1 / (1 + e^-2.1) = 1 / 1.1224564 = 0.8909031
    #   a_big = 0.1090969
    #   n_mid = 320 * 0.8909031 = 285.09 -> 285 (< 400, stays);  n_big = 320 * 0.1090969 = 34.91 -> 35
    assert a.full == ["tiny"]
    assert a.shares == pytest.approx({"big": 0.1090969, "mid": 0.8909031}, abs=1e-7)
    assert a.prune == {"big": 35, "mid": 285, "tiny": 40, "dead": 0, "empty": 0}
    assert sorted(a.frozen) == ["dead", "empty"]
    # the surplus of tiny went to the others: they share 360 - 40 = 320 instead of ~0 in round 1
    assert a.prune["big"] + a.prune["mid"] == 320


def test_rate_half_redistributed_surplus_drives_a_second_layer_to_100_percent():
    a = allocate(toy(), rate=0.5)
    # B = 0.5 * 1440 = 720
    # round 1 as above: tiny takes ~all 720 >= 40 -> 100 %;  B = 680, S = 0.7
    # round 2: a_mid = 0.8909031 -> n_mid = 680 * 0.8909031 = 605.8 >= 400 -> mid -> 100 %
    #          (in round 1 mid's share was e^(3.55 - 71) ~ 0: only the redistribution saturates it)
    # round 3: B = 680 - 400 = 280, pool = {big}: a_big = 1, n_big = 280 < 1000
    assert a.budget == 720
    assert a.full == ["tiny", "mid"]
    assert a.prune == {"big": 280, "mid": 400, "tiny": 40, "dead": 0, "empty": 0}
    assert a.shares == {"big": 1.0}


def test_rate_one_empties_every_live_layer_and_only_those():
    a = allocate(toy(), rate=1.0)
    assert a.prune == {"big": 1000, "mid": 400, "tiny": 40, "dead": 0, "empty": 0}
    assert sorted(a.full) == ["big", "mid", "tiny"]


def test_only_frozen_layers_means_nothing_is_pruned():
    layers = [LayerState("a", 0.0, 0.2, 10), LayerState("b", 0.9, 0.0, 0)]
    a = allocate(layers, 0.5)
    assert a.prune == {"a": 0, "b": 0} and a.full == [] and a.budget == 0 and sorted(a.frozen) == ["a", "b"]


def test_extreme_irrelevance_ratios_do_not_overflow():
    # S / I spans 1e12: a naive exp() would overflow; the softmax must subtract its maximum
    layers = [LayerState("x", 1e-12, 1e-3, 50), LayerState("y", 1.0, 1.0, 50)]
    a = allocate(layers, 0.5)
    # B = 50; x takes ~all of it: n_x = 50 >= 50 -> x to 100 %, B = 0 -> y gets nothing
    assert a.prune == {"x": 50, "y": 0} and a.full == ["x"]


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, math.nan])
def test_rate_validation(rate):
    with pytest.raises(ValueError, match="rate"):
        allocate(toy(), rate)


@pytest.mark.parametrize("rate", [0.0, 1.0, 1.2])
def test_prune_config_rejects_rates_outside_open_interval(rate):
    # a run keeps something to prune next iteration: rate 1 is refused at the CLI level
    with pytest.raises(UsageError, match=r"^rate must be"):  # the library names its parameter, the command its flag
        PruneConfig(rate=rate).validate()


layer_sets = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.05, 0.3, 0.9, 1.0]),  # entropy
        st.floats(1e-4, 2.0),  # mean |w|
        st.integers(0, 500),  # remaining weights
    ),
    min_size=1, max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(layer_sets, st.sampled_from([0.1, 0.3, 0.5, 0.8]))
def test_allocation_invariants(specs, rate):
    layers = [LayerState(f"l{i}", h, m, n) for i, (h, m, n) in enumerate(specs)]
    a = allocate(layers, rate)
    live = [l for l in layers if l.entropy > 0 and l.remaining > 0]
    assert set(a.prune) == {l.name for l in layers}
    for l in layers:
        assert 0 <= a.prune[l.name] <= l.remaining
        if l not in live:
            assert a.prune[l.name] == 0 and l.name in a.frozen
    for name in a.full:
        assert a.prune[name] == next(l.remaining for l in layers if l.name == name)
    assert a.budget == round(rate * sum(l.remaining for l in live))
    _spends_exactly_its_budget(a, layers)
    if a.shares:
        assert sum(a.shares.values()) == pytest.approx(1.0)


def _spends_exactly_its_budget(a, layers):
    """The weights pruned add up to the whole-weight budget, never more; less only when every live
    layer already gives all it may (its limit)."""
    total = sum(a.prune.values())
    assert total <= a.budget
    if total < a.budget:
        assert all(a.prune[l.name] == l.limit for l in layers if l.entropy > 0 and l.remaining > 0)


# Caps (LayerState.max_prune): the most a layer may lose this iteration. A capped layer whose
# share reaches its cap stops there, leaves the pool, and its surplus goes to the others exactly
# like a 100 % layer's.

def _with_caps(caps: dict[str, int]) -> list[LayerState]:
    return [LayerState(l.name, l.entropy, l.mean_abs, l.remaining, caps.get(l.name)) for l in toy()]


def test_capped_layer_stops_at_its_cap_and_the_surplus_goes_to_the_others():
    a = allocate(_with_caps({"tiny": 30}), rate=0.25)  # tiny keeps at least 10 of its 40
    # B = 360; round 1: n_tiny ~ 360 >= 30 -> tiny stops at 30, B = 360 - 30 = 330, S = 0.7
    # round 2: a_mid = 0.8909031, a_big = 0.1090969 (as without caps)
    #   n_mid = 330 * 0.8909031 = 293.998 -> 294;  n_big = 330 * 0.1090969 = 36.002 -> 36
    assert a.budget == 360
    assert a.capped == ["tiny"] and a.full == []
    assert a.prune == {"big": 36, "mid": 294, "tiny": 30, "dead": 0, "empty": 0}
    assert sum(a.prune.values()) == 360  # the budget is spent in full, only elsewhere


def test_a_cap_reached_by_redistribution_passes_its_surplus_on():
    a = allocate(_with_caps({"mid": 300}), rate=0.5)
    # B = 720; round 1: tiny -> 100 % (40), B = 680
    # round 2: n_mid = 680 * 0.8909031 = 605.8 >= its cap 300 -> mid stops at 300, B = 380
    # round 3: pool = {big}: n_big = 380 (uncapped: 280, as mid took 400)
    assert a.full == ["tiny"] and a.capped == ["mid"]
    assert a.prune == {"big": 380, "mid": 300, "tiny": 40, "dead": 0, "empty": 0}


def test_a_layer_at_its_cap_takes_nothing_and_its_share_is_redistributed():
    a = allocate(_with_caps({"tiny": 0}), rate=0.25)
    # tiny saturates at 0 in round 1; round 2 shares all of B = 360 between mid and big:
    #   n_mid = 360 * 0.8909031 = 320.73 -> 321;  n_big = 360 * 0.1090969 = 39.27 -> 39
    assert a.capped == ["tiny"]
    assert a.prune == {"big": 39, "mid": 321, "tiny": 0, "dead": 0, "empty": 0}


def test_a_cap_that_does_not_bind_changes_nothing():
    assert allocate(_with_caps({"big": 900, "tiny": 40}), 0.25) == allocate(toy(), 0.25)


def test_zero_irrelevance_layer_with_a_cap_stops_at_it():
    # I = 0 layers saturate before the softmax; with a cap they stop there instead of at 100 %
    layers = [LayerState("flat", 0.5, 0.0, 50, max_prune=20), LayerState("other", 1.0, 1.0, 150)]
    a = allocate(layers, 0.5)
    # B = 100; flat stops at 20, other gets the remaining 80
    assert a.capped == ["flat"] and a.prune == {"flat": 20, "other": 80}


@settings(max_examples=150, deadline=None)
@given(layer_sets, st.sampled_from([0.1, 0.3, 0.5, 0.8]), st.lists(st.one_of(st.none(), st.integers(0, 600)), min_size=8, max_size=8))
def test_capped_allocation_invariants(specs, rate, caps):
    layers = [LayerState(f"l{i}", h, m, n, caps[i]) for i, (h, m, n) in enumerate(specs)]
    a = allocate(layers, rate)
    uncapped = allocate([LayerState(l.name, l.entropy, l.mean_abs, l.remaining) for l in layers], rate)
    for l in layers:
        assert 0 <= a.prune[l.name] <= l.limit
    for name in a.capped:
        layer = next(l for l in layers if l.name == name)
        assert a.prune[name] == layer.max_prune < layer.remaining
    assert not set(a.capped) & set(a.full)
    if all(c is None or c >= l.remaining for c, l in zip(caps, layers)):
        assert a == uncapped  # caps at or above what is left are no caps
    # caps never make the iteration prune more than its budget, the uncapped one's
    assert a.budget == uncapped.budget
    _spends_exactly_its_budget(a, layers)


def test_capped_allocation_found_by_hypothesis_stays_within_its_budget():
    # B = 0.8 * 2252 = 1801.6 -> 1802. l4 stops at its cap 429, the three equal layers share the
    # other 1373: 457.67 each; rounded one by one (458 x 3) they gave 1803 > 1802
    specs = [(0.05, 1.0, 458)] * 3 + [(0.3, 2.0, 378), (0.05, 1.0, 500)]
    layers = [LayerState(f"l{i}", h, m, n, 429 if i == 4 else None) for i, (h, m, n) in enumerate(specs)]
    a = allocate(layers, 0.8)
    assert a.budget == 1802 and a.capped == ["l4"]
    assert sum(a.prune.values()) == 1802
    assert sorted(a.prune[f"l{i}"] for i in range(3)) == [457, 458, 458] and a.prune["l4"] == 429
    assert a.prune["l3"] == 0  # its share is 3.6e-7 of the budget


def test_zero_irrelevance_layers_take_the_budget_but_never_more():
    # a layer whose weights are all ~0 (I = 0) is the least relevant: it takes the budget first,
    # up to its limit, and never more than the budget (B = 0.5 * 120 = 60 < its 100 weights)
    layers = [LayerState("flat", 0.5, 0.0, 100), LayerState("other", 1.0, 1.0, 20)]
    a = allocate(layers, 0.5)
    assert a.prune == {"flat": 60, "other": 0} and a.full == [] and a.capped == []


def test_temperature_one_is_the_paper_and_lower_concentrates_the_budget():
    layers = [LayerState("a", entropy=1.0, mean_abs=0.30, remaining=1000),  # I = 0.30
              LayerState("b", entropy=1.0, mean_abs=0.25, remaining=1000),  # I = 0.25
              LayerState("c", entropy=1.0, mean_abs=0.20, remaining=1000)]  # I = 0.20
    assert allocate(layers, 0.3, temperature=1.0) == allocate(layers, 0.3)
    # S = 0.75; S / I = 2.5, 3, 3.75.  T = 0.5 doubles the logits: 5, 6, 7.5
    #   softmax: e^-2.5, e^-1.5, 1 over their sum = 0.0610, 0.1657, 0.7733 (budget 900: c gets 696 < 1000)
    hot = allocate(layers, 0.3, temperature=0.5)
    z = math.exp(-2.5) + math.exp(-1.5) + 1.0
    assert hot.shares == pytest.approx({"a": math.exp(-2.5) / z, "b": math.exp(-1.5) / z, "c": 1.0 / z}, abs=1e-9)
    # n = 56.60, 153.86, 689.54: rounded one by one they would add up to 901 > 900; largest
    # remainder gives the floors (898) one more weight each to the two largest fractions (b, a)
    assert hot.prune == {"a": 57, "b": 154, "c": 689}
    assert sum(hot.prune.values()) == hot.budget == 900
    paper = allocate(layers, 0.3)
    assert hot.prune["c"] > paper.prune["c"] and hot.prune["a"] < paper.prune["a"]
    # cold enough, the least relevant layer empties and its surplus goes to the next one
    cold = allocate(layers, 0.5, temperature=0.05)
    assert cold.full == ["c"] and cold.prune["c"] == 1000 and cold.prune["b"] == 500 and cold.prune["a"] == 0
    with pytest.raises(ValueError):
        allocate(layers, 0.5, temperature=0.0)
    with pytest.raises(UsageError):
        PruneConfig(temperature=-1.0).validate()
