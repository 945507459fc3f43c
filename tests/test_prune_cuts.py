"""Cut layers (egp_deploy/prune/cuts.py): prunable layers no input-output path avoids.

Checked structurally (which names) and semantically: zeroing a cut layer's weights makes the
output the same for every input; zeroing any other prunable layer does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from egp_deploy.archs import create_model
from egp_deploy.prune.cuts import find_cut_layers
from egp_deploy.prune.sites import prunable_layers


def _model(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1, **kw)
    # BN statistics of the data it sees: with the default ones a deep untrained net's outputs
    # barely depend on its input, and the constant-output probe below could not tell
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = None  # a plain average over the calibration batch
            bn.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(32, 1, 32, 32))
    return model.eval()


def _constant_output_when_zeroed(model: nn.Module, layer: str, x: torch.Tensor) -> bool:
    weight = dict(model.named_parameters())[f"{layer}.weight"]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
        y = model(x)
        weight.copy_(saved)
    return bool((y[0] - y[1]).abs().max() <= 1e-5 * y.abs().max())


def _check_semantics(model: nn.Module, layers: list[str], cuts: list[str]) -> None:
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    wrong = [l for l in layers if _constant_output_when_zeroed(model, l, x) != (l in cuts)]
    assert wrong == []


def test_resnet18_only_the_stem_is_a_cut_layer():
    model = _model("resnet18", width=4)
    layers = prunable_layers(model)
    cuts = find_cut_layers(model, layers)
    assert cuts.known and cuts.layers == ["conv1"]  # every in-block conv has a shortcut beside it
    _check_semantics(model, layers, cuts.layers)


def test_vgg16_bn_every_prunable_layer_is_a_cut_layer():
    model = _model("vgg16_bn", width=4)
    layers = prunable_layers(model)
    cuts = find_cut_layers(model, layers)
    assert cuts.layers == layers and len(layers) == 15  # 13 convs and the two hidden Linears
    _check_semantics(model, layers, cuts.layers)


def test_mobilenet_v2_cut_layers_are_the_blocks_without_residual():
    model = _model("mobilenet_v2", width_mult=0.5)
    layers = prunable_layers(model)
    cuts = find_cut_layers(model, layers).layers
    residual = {f"features.{i}" for i, b in enumerate(model.features) if getattr(b, "use_res_connect", False)}
    assert residual  # the architecture does have residual blocks to tell apart
    expected = [l for l in layers if ".".join(l.split(".")[:2]) not in residual]
    assert cuts == expected
    assert "features.0.0" in cuts and "features.18.0" in cuts  # stem and last 1x1 conv
    _check_semantics(model, layers, cuts)


def test_shape_reads_are_not_a_bypass():
    # x.size(0) after the layer feeds a reshape of the output: no data flows around the layer
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.relu, self.second = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            n = x.size(0)
            return self.second(self.relu(self.first(x))).reshape(n, -1) + x.shape[1]

    cuts = find_cut_layers(Net(), ["first", "second"])
    assert cuts.layers == ["first", "second"]


def test_untraceable_model_gives_unknown_and_says_why():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(x)) if x.sum() > 0 else x

    cuts = find_cut_layers(DataDependent(), ["fc"])
    assert not cuts.known and cuts.layers is None and "cannot trace" in cuts.note


@pytest.mark.parametrize("arch, kw", [("vit_tiny", {"width": 16, "layers": 2})])
def test_transformer_mlp_layers_are_bypassed(arch, kw):
    model = create_model(arch, num_classes=10, in_channels=1, **kw)
    layers = prunable_layers(model)
    assert layers and find_cut_layers(model, layers).layers == []


def test_prune_loop_never_empties_a_cut_layer_with_the_guard(tmp_path):
    """VGG (every prunable layer is a cut layer): without the guard EGP empties some in the first
    iterations; with it each keeps its minimum, and the log says which layers were capped."""

    from egp_deploy.checkpoint import checkpoint_from_model
    from egp_deploy.data import load_data
    from egp_deploy.prune.loop import PruneConfig, run_pruning
    from egp_deploy.prune.train import TrainConfig

    bundle = load_data("plugin:plugin_data:small_digits")
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "width": 4}
    model = create_model("vgg16_bn", **kw)
    for bn in model.modules():  # non-trivial BN statistics: activations are not symmetric around 0
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    start = checkpoint_from_model(model, "vgg16_bn", kw, bundle.input_shape, 10, {"data": "small"})

    def run(min_keep_cut: float) -> dict:
        cfg = PruneConfig(iterations=3, finetune=TrainConfig(epochs=0), min_keep_cut=min_keep_cut)
        return run_pruning(start, bundle, cfg, tmp_path / str(min_keep_cut), progress=False).log

    unguarded = run(0.0)
    assert unguarded["cut_layer_min_keep"] == {}
    assert any(r["all_zero_layers"] for r in unguarded["iterations"])  # the failure the guard prevents

    guarded = run(0.01)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert guarded["cut_layers"] == guarded["prunable_layers"]
    assert guarded["cut_layer_min_keep"]["classifier.0"] == -(-sizes["classifier.0.weight"] // 100)  # ceil(1 %)
    for it in range(1, 4):
        state = torch.load(tmp_path / "0.01" / f"iter_{it:02d}.pt", weights_only=True)["state_dict"]
        for layer, keep in guarded["cut_layer_min_keep"].items():
            assert int((state[f"{layer}.weight"] != 0).sum()) >= keep, (it, layer)
    recs = guarded["iterations"][1:]
    assert all(r["all_zero_layers"] == [] for r in recs)
    assert any(r["allocation"]["capped"] for r in recs)
    # the budget a capped layer could not take went elsewhere: same nominal sparsity as unguarded
    assert recs[0]["sparsity_prunable"] == pytest.approx(unguarded["iterations"][1]["sparsity_prunable"], abs=1e-3)
