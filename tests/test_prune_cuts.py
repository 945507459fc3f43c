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
