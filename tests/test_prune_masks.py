"""Pruning masks (egp_deploy/prune/masks.py) and masked fine-tuning (train.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from egp_deploy.checkpoint import checkpoint_from_model, load_checkpoint, save_checkpoint
from egp_deploy.errors import NonFiniteError
from egp_deploy.prune import masks as M
from egp_deploy.prune.train import TrainConfig, fit, make_optimizer, train_one_epoch


def test_prune_smallest_removes_exactly_the_n_smallest_kept_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[0, :2] = False  # already pruned: must not be counted again, whatever their value
    w[0, :2] = 1e-9
    new = M.prune_smallest(w, mask, 7)
    removed = mask & ~new
    assert int(removed.sum()) == 7 and not (new & ~mask).any()  # never resurrects
    kept_mags = w[mask].abs()
    threshold = kept_mags.sort().values[6]
    assert torch.all(w[removed].abs() <= threshold) and torch.all(w[new].abs() >= threshold)
    assert M.prune_smallest(w, mask, 0).equal(mask)
    assert int(M.prune_smallest(w, mask, 10**6).sum()) == 0


def test_prune_smallest_ties_are_deterministic_by_position():
    w = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.5])
    new = M.prune_smallest(w, torch.ones(5, dtype=torch.bool), 2)
    assert new.tolist() == [True, False, False, True, True]


def test_global_l1_picks_the_global_smallest_over_partly_pruned_layers():
    params = {
        "a.weight": torch.tensor([[0.9, 0.02], [0.4, 0.03]]),
        "b.weight": torch.tensor([0.01, 0.5, 0.05, 0.0001]),
        "c.weight": torch.tensor([2.0, 3.0]),
    }
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in params.items()}
    masks["b.weight"][3] = False  # 0.0001 is already gone: the next four smallest are 0.01 0.02 0.03 0.05
    new = M.prune_global_smallest(params, masks, 4)
    assert new["a.weight"].tolist() == [[True, False], [True, False]]
    assert new["b.weight"].tolist() == [False, True, False, False]
    assert new["c.weight"].tolist() == [True, True]
    assert sum(int((masks[k] & ~new[k]).sum()) for k in masks) == 4
    # per-layer L1 at the same count would have taken layer c's weights; global never does here
    assert M.prune_global_smallest(params, masks, 0)["b.weight"].equal(masks["b.weight"])


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def tiny_loader(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)


def half_masks(model, layers):
    params = dict(model.named_parameters())
    masks = M.full_masks(model, layers)
    for k in masks:
        masks[k] = M.prune_smallest(params[k], masks[k], params[k].numel() // 2)
    M.apply_masks(model, masks)
    return masks


def test_masked_weights_stay_exactly_zero_through_sgd_with_momentum_and_decay():
    model = tiny_net()
    layers = ["0", "3", "6"]
    masks = half_masks(model, layers)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=0.2, momentum=0.9, weight_decay=5e-2))
    for epoch in range(3):  # several epochs x 6 steps: momentum carries over between steps
        train_one_epoch(model, tiny_loader(epoch), opt, masks)
    params = dict(model.named_parameters())
    for k, m in masks.items():
        assert torch.all(params[k][~m] == 0), k
        assert not torch.equal(params[k][m], before[k][m]), k  # kept weights did train
        buf = opt.state[params[k]]["momentum_buffer"]
        assert torch.all(buf[~m] == 0), k  # no momentum left to push them off zero later


def test_without_masks_the_same_steps_would_move_pruned_weights():
    """Control for the test above: the zeros survive because of the masks, not by accident."""
    model = tiny_net()
    masks = half_masks(model, ["0", "3", "6"])
    opt = make_optimizer(model, TrainConfig(lr=0.2, momentum=0.9, weight_decay=5e-2))
    train_one_epoch(model, tiny_loader(0), opt, masks=None)
    params = dict(model.named_parameters())
    assert any(bool((params[k][~m] != 0).any()) for k, m in masks.items())


def test_fit_keeps_masks_and_is_deterministic():
    def run():
        model = tiny_net()
        masks = half_masks(model, ["0", "3"])
        cfg = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="step")
        hist = fit(model, lambda e: tiny_loader(e), cfg, masks=masks, show_progress=False)
        return model, masks, hist

    m1, masks, h1 = run()
    m2, _, h2 = run()
    assert [r["lr"] for r in h1] == [0.1, 0.1 * 0.1]  # step schedule: x0.1 at 50 % of 2 epochs
    assert h1 == h2
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    params = dict(m1.named_parameters())
    assert all(torch.all(params[k][~m] == 0) for k, m in masks.items())


def test_non_finite_loss_raises_and_says_whether_the_data_is_to_blame():
    model = tiny_net()
    x = torch.randn(4, 1, 6, 6)
    x[2, 0, 1, 1] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=4)
    with pytest.raises(NonFiniteError, match="training data contains NaN/Inf"):
        train_one_epoch(model, loader, make_optimizer(model, TrainConfig()))
    with torch.no_grad():
        model[6].weight.fill_(1e38)  # finite data, diverged weights: logits overflow
    with pytest.raises(NonFiniteError, match="non-finite training loss .*lower the learning rate"):
        train_one_epoch(model, tiny_loader(), make_optimizer(model, TrainConfig()))


def test_masks_from_zeros_round_trip_through_a_checkpoint(tmp_path):
    model = tiny_net()
    layers = ["0", "3", "6"]
    masks = half_masks(model, layers)
    path = tmp_path / "m.pt"
    save_checkpoint(path, checkpoint_from_model(model, "none", {}, (1, 6, 6), 3))
    sd = torch.load(path, weights_only=True)["state_dict"]
    fresh = tiny_net()
    fresh.load_state_dict(sd)
    again = M.masks_from_zeros(fresh, layers)
    assert set(again) == set(masks) == {"0.weight", "3.weight", "6.weight"}
    for k in masks:
        assert torch.equal(again[k], masks[k]), k
    assert load_checkpoint(path).arch == "none"


def test_sparsity_all_zero_layers_and_zero_output_channels():
    model = tiny_net()
    with torch.no_grad():
        model[0].weight.zero_()  # 4 x 1 x 3 x 3 = 36 zeros, all 4 output channels
        model[3].weight[1].zero_()  # one output channel of 4 x 3 x 3 = 36 weights
    # weights: 36 + 144 + 432 = 612; zeros: 36 + 36 = 72
    assert M.sparsity(model, ["0", "3", "6"]) == pytest.approx(72 / 612)
    assert M.sparsity(model, ["0"]) == 1.0
    assert M.all_zero_layers(model, ["0", "3", "6"]) == ["0"]
    assert M.zero_output_channels(model, ["0", "3", "6"]) == {"0": 4, "3": 1, "6": 0}


def test_smallest_selects_what_a_stable_sort_selects():
    """The k-th value search keeps the stable sort's choice exactly, ties by position included."""
    from egp_deploy.prune.masks import smallest

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 50, (1,), generator=g))
        values = torch.randint(0, 4, (n,), generator=g).float() if trial % 2 else torch.rand(n, generator=g)
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.sort(values, stable=True).indices[:k]] = True
        assert torch.equal(smallest(values, k), expected), (values.tolist(), k)
