"""Small blocks of architectures outside the zoo, for the surgery tests (no tests here): a dense-
concatenation block (DenseNet), an Inception-style block, a fire (squeeze-expand) module, a ConvNeXt
block, a token-mixing MLP block, a ShuffleNetV2 split/shuffle unit and a ResNeXt/RegNet grouped
bottleneck, each with a stem and a head, exportable with either exporter; and two small graphs for the
multi-reader merge (a fire module whose squeeze is linear on the data, a trunk read by two heads)."""

from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn as nn


def export(module: nn.Module, shape: tuple[int, ...], dynamo: bool, dynamic_batch: bool = False) -> onnx.ModelProto:
    """The legacy exporter (opset 17) or the dynamo one (opset 18, optimised); static shapes unless
    ``dynamic_batch`` (a symbolic batch dimension)."""
    module = module.eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, input_names=["x"],
                                     output_names=["y"], verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N")},) if dynamic_batch else None)
            prog.optimize()
            return prog.model_proto
        f = io.BytesIO()
        torch.onnx.export(module, x, f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None)
    return onnx.load_from_string(f.getvalue())


def _bn_randomized(bn: nn.BatchNorm2d, g: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
    return bn


def _all_bn_randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm of ``module`` randomized, in module order, from one generator."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            _bn_randomized(m, g)
    return module


class DenseLayer(nn.Module):
    """DenseNet's BN-ReLU-conv1x1-BN-ReLU-conv3x3, its output concatenated to its input."""

    def __init__(self, cin: int, growth: int, g: torch.Generator) -> None:
        super().__init__()
        self.norm1 = _bn_randomized(nn.BatchNorm2d(cin), g)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = _bn_randomized(nn.BatchNorm2d(2 * growth), g)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat([x, y], 1)


class DenseBlock(nn.Module):
    """Stem, ``layers`` dense layers (each reads the concatenation of all before it), transition 1x1
    conv, pooled head. Layers: 1 + 2 * layers + 1 + 1 (Gemm)."""

    def __init__(self, layers: int = 3, stem: int = 8, growth: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1)
        self.layers = nn.Sequential(*[DenseLayer(stem + i * growth, growth, g) for i in range(layers)])
        width = stem + layers * growth
        self.norm = _bn_randomized(nn.BatchNorm2d(width), g)
        self.transition = nn.Conv2d(width, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layers(torch.relu(self.stem(x)))
        x = self.transition(torch.relu(self.norm(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    """Stem, four branches (1x1; 1x1 -> 3x3; 1x1 -> 5x5; maxpool -> 1x1), concatenated, a 3x3 conv
    reading the concatenation, pooled head. Layers: 1 + 6 + 1 + 1 (Gemm)."""

    def __init__(self, stem: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1)
        self.b1 = nn.Conv2d(stem, 8, 1)
        self.b2a, self.b2b = nn.Conv2d(stem, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.b3a, self.b3b = nn.Conv2d(stem, 4, 1), nn.Conv2d(4, 8, 5, padding=2)
        self.b4 = nn.Conv2d(stem, 8, 1)
        self.mix = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        branches = [
            torch.relu(self.b1(x)),
            torch.relu(self.b2b(torch.relu(self.b2a(x)))),
            torch.relu(self.b3b(torch.relu(self.b3a(x)))),
            torch.relu(self.b4(nn.functional.max_pool2d(x, 3, 1, 1))),
        ]
        x = torch.relu(self.mix(torch.cat(branches, 1)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze 1x1, then expand 1x1 and expand 3x3 concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class FireNet(nn.Module):
    """Stem, two fire modules, classifier conv, pooled. Layers: 1 + 3 + 3 + 1."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.fire1 = Fire(16, 8, 16)
        self.fire2 = Fire(32, 8, 16)
        self.classifier = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.fire2(self.fire1(torch.relu(self.stem(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.classifier(x), 1), 1)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, permute to channels-last, LayerNorm, Linear-GELU-Linear, layer scale,
    permute back, residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    """Patchify stem, ``blocks`` ConvNeXt blocks, pooled LayerNorm head. Layers: 1 + 3 * blocks + 1."""

    def __init__(self, dim: int = 16, blocks: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(in_channels, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


class MixerBlock(nn.Module):
    """MLP-Mixer: token mixing (LayerNorm, transpose, MLP over tokens, transpose back, add), then
    channel mixing (LayerNorm, MLP over channels, add), on (N, L, C) tokens."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1, self.token_fc2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1, self.channel_fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(nn.functional.gelu(self.token_fc1(y))).transpose(1, 2)
        return x + self.channel_fc2(nn.functional.gelu(self.channel_fc1(self.norm2(x))))


class MixerNet(nn.Module):
    """Patchify stem to (N, L, C) tokens, ``blocks`` mixer blocks, pooled head. Layers: 1 + 4 * blocks + 1."""

    def __init__(self, dim: int = 16, blocks: int = 2, patch: int = 8, size: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x).mean(1))


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """stem 3x3 conv + ReLU -> ShuffleNetV2 stride-1 unit (split in two halves; the second through
    1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat; channel shuffle) -> 1x1 head conv -> mean.
    Layers: 1 + 3 + 1."""

    def __init__(self, c: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        h = c // 2
        self.stem, self.stem_act = nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU()
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.head = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        a, b = x.chunk(2, dim=1)
        y = channel_shuffle(torch.cat([a, self.branch(b)], 1))
        return self.head(y).mean((2, 3))


def shuffle_unit(plant: bool, in_channels: int = 3) -> ShuffleUnit:
    """A seeded ShuffleUnit (c=16) with random BN statistics; ``plant``: dead channels on both sides of
    the split, concat and shuffle (rows that are 0 after their ReLU for any input)."""
    torch.manual_seed(0)
    net = _all_bn_randomized(ShuffleUnit(c=16, in_channels=in_channels))
    if plant:
        with torch.no_grad():
            net.stem.weight[0:4] = 0.0  # stem channels 0..3 -> the untouched half -> concat -> shuffle -> head
            net.stem.bias[0:4] = -1.0
            net.stem.weight[8:12] = 0.0  # stem channels 8..11 -> the branch's first 1x1
            net.stem.bias[8:12] = -1.0
            net.branch[5].weight[0:4] = 0.0  # branch outputs 0..3 are 0 after BN + ReLU -> concat -> head
            net.branch[6].bias[0:4] = -5.0
    return net.eval()


class GroupedBottleneck(nn.Module):
    """stem 3x3 conv + ReLU -> ResNeXt bottleneck (1x1-BN-ReLU, grouped 3x3-BN-ReLU with ``groups``
    groups, 1x1-BN, + x, ReLU) -> mean. Layers: 1 + 3."""

    def __init__(self, c: int = 32, groups: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem, self.stem_act = nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + x).mean((2, 3))


def grouped_bottleneck(dead_rows, in_channels: int = 3) -> GroupedBottleneck:
    """A seeded GroupedBottleneck (32 channels, 4 groups) with random BN statistics, its conv1 rows
    ``dead_rows`` 0 after BN + ReLU for any input: the grouped conv's inputs there are dead."""
    torch.manual_seed(0)
    net = _all_bn_randomized(GroupedBottleneck(c=32, groups=4, in_channels=in_channels))
    with torch.no_grad():
        net.conv1.weight[dead_rows] = 0.0
        net.bn1.bias[dead_rows] = -5.0
    return net.eval()


class PooledFire(nn.Module):
    """A fire module for the multi-reader merge: squeeze 1x1 -> ReLU -> expand 1x1 and expand 3x3
    (padded) -> concat -> ReLU -> mean. ``linear_squeeze``: the squeeze's bias keeps its ReLU ON for
    any input here, so the surgery strips it and the squeeze is one linear layer read by two convs."""

    def __init__(self, c: int = 16, s: int = 4, e: int = 8, linear_squeeze: bool = True) -> None:
        super().__init__()
        self.squeeze, self.act = nn.Conv2d(c, s, 1), nn.ReLU()
        self.expand1, self.expand3 = nn.Conv2d(s, e, 1), nn.Conv2d(s, e, 3, padding=1)
        self.out = nn.ReLU()
        if linear_squeeze:
            with torch.no_grad():
                self.squeeze.bias.fill_(50.0)

    def forward(self, x):
        y = self.act(self.squeeze(x))
        return self.out(torch.cat([self.expand1(y), self.expand3(y)], 1)).mean((2, 3))


class SharedHeads(nn.Module):
    """Linear (8 -> 16) -> ReLU (ON for any input here) -> two 16 -> 2 heads, multiplied."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.act = nn.Linear(8, 16), nn.ReLU()
        self.head_a, self.head_b = nn.Linear(16, 2), nn.Linear(16, 2)
        with torch.no_grad():
            self.shared.bias.fill_(50.0)

    def forward(self, x):
        y = self.act(self.shared(x))
        return self.head_a(y) * self.head_b(y)


def collapsed(name: str, in_channels: int = 3) -> nn.Module:
    """The block ``name`` with the collapse the tests plant (all-zero layers or dead channels, as EGP
    leaves them)."""
    with torch.no_grad():
        if name == "dense":  # two dense layers' outputs constant: slices of every later Concat
            net = DenseBlock(layers=3, in_channels=in_channels)
            net.layers[0].conv2.weight.zero_()
            net.layers[1].conv2.weight.zero_()
        elif name == "inception":
            net = InceptionBlock(in_channels=in_channels)
            net.b1.weight.zero_()  # a uniform constant: relu(bias)
            net.b2a.weight.zero_()  # then b2b's padded 3x3 makes the branch a non-uniform constant map
        elif name == "fire":
            net = FireNet(in_channels=in_channels)
            net.fire1.expand3x3.weight.zero_()
            net.fire2.expand1x1.weight.zero_()
        elif name == "convnext":
            net = ConvNeXtNet(dim=16, blocks=3, in_channels=in_channels)
            net.blocks[0].pwconv2.weight.zero_()  # the branch is fc2's bias, times the layer scale
            net.blocks[2].pwconv1.weight.zero_()  # GELU(b1) @ W2 + b2, times the layer scale
        elif name == "mixer":
            net = MixerNet(dim=16, blocks=2, in_channels=in_channels)
            net.blocks[0].token_fc2.weight.zero_()
            net.blocks[1].token_fc1.weight.zero_()
        elif name == "shuffle":
            return shuffle_unit(plant=True, in_channels=in_channels)
        elif name == "grouped":  # conv1's last 16 rows dead: whole groups 2 and 3 of the grouped 3x3
            return grouped_bottleneck(list(range(16, 32)), in_channels=in_channels)
        else:
            raise KeyError(name)
    return net.eval()


LAYER_OPS = ("Conv", "Gemm", "MatMul")


def layer_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in LAYER_OPS for n in model.graph.node)


def counts_from_both_exporters(name: str, shape: tuple[int, ...], calibration, options, summary_key: str) -> list[tuple]:
    """The collapsed block ``name`` exported with dynamo=False and dynamo=True, each surgered with
    ``options`` and checked exact on ``calibration``: (layers before, layers after, layers the report
    says it removed, ``report["summary"][summary_key]``) per exporter."""
    from egp_deploy.surgery import optimize

    net, counts = collapsed(name), []
    for dynamo in (False, True):
        model = export(net, shape, dynamo)
        res = optimize(model, calibration, None, options)
        assert res.report["verification"]["calibration"]["rel_error"] <= 1e-5
        counts.append((layer_count(model), layer_count(res.model), res.report["summary"]["layers_removed"],
                       res.report["summary"][summary_key]))
    return counts


def assert_report_honest(model: onnx.ModelProto, result) -> None:
    """The report claims only what happened: the layers it lists as removed are gone (and their
    number is the drop in the layer count), every narrowing it lists names layers that are still
    there, and the dense MACs did not go up."""
    report, out = result.report, result.model
    remaining = {n.name for n in out.graph.node}
    assert report["summary"]["layers_removed"] == layer_count(model) - layer_count(out)
    assert report["after"]["conv_gemm_layers"] == layer_count(out)
    for rec in report["changes"]["dead_channels"]:
        assert set(rec["producers"]) <= remaining and set(rec["readers"]) <= remaining, rec
    for rec in report["changes"]["mlp_units"]:
        assert {rec["fc1"], rec["fc2"]} <= remaining, rec
    assert report["after"]["macs_dense"] <= report["before"]["macs_dense"]


def unpruned(name: str, in_channels: int = 3) -> nn.Module:
    """The block ``name`` at the sizes ``collapsed`` uses, nothing zeroed."""
    if name == "shuffle":
        return shuffle_unit(plant=False, in_channels=in_channels)
    if name == "grouped":
        return grouped_bottleneck([], in_channels=in_channels)
    kwargs = {"convnext": {"dim": 16, "blocks": 3}, "mixer": {"dim": 16, "blocks": 2}}.get(name, {})
    builders = {"dense": DenseBlock, "inception": InceptionBlock, "fire": FireNet, "convnext": ConvNeXtNet,
                "mixer": MixerNet}
    return builders[name](in_channels=in_channels, **kwargs).eval()


BLOCK_NAMES = ("dense", "inception", "fire", "convnext", "mixer", "shuffle", "grouped")
NARROWING_BLOCKS = ("shuffle", "grouped")
"""Blocks whose planted collapse is dead channels: an exact surgery keeps every layer, narrower."""
