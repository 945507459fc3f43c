"""Site discovery on torchvision and timm architectures (built without weights, 32x32 inputs).

Expected counts come from each architecture's definition (worked out in the comments); the
discovery itself never reads a module name. Every found site is then measured once and must have
as many neurons as its feeder has output channels (the feeder really is what the activation
sees). Skips cleanly without torchvision / timm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from zoo_imports import import_timm, import_torchvision

from egp_deploy.prune import Pruner


def check(model: nn.Module, sites: int, prunable: int | None = None) -> Pruner:
    """Discover (fx), count, and measure once: each site's neurons = its feeder's output channels."""
    pruner = Pruner(model, torch.zeros(2, 3, 32, 32))
    assert pruner.discovery.method == "fx"
    assert len(pruner.sites) == sites
    assert len(pruner.layers) == (sites if prunable is None else prunable)
    stats = pruner.measure([torch.randn(2, 3, 32, 32)])
    params = dict(model.named_parameters())
    for s in pruner.sites:
        assert s.name in stats, s.name
        if s.feeder is not None:
            assert stats[s.name].channels == params[f"{s.feeder}.weight"].shape[0], s
    return pruner


def feeders(pruner: Pruner) -> dict[str, str | None]:
    return {s.name: s.feeder for s in pruner.sites}


def never(pruner: Pruner, layers) -> None:
    layers = set(layers)
    assert layers and not layers & set(pruner.layers), sorted(layers & set(pruner.layers))


def weight_layers(model: nn.Module, pred) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and pred(n, m)]


def blocks(model: nn.Module, cls) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


# ---- torchvision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, per_block", [("resnet18", 2), ("resnet50", 3)])
def test_torchvision_resnet_shared_relu_is_one_site_per_call(arch, per_block):
    tv = import_torchvision().models
    model = getattr(tv, arch)(num_classes=10)
    cls = tv.resnet.BasicBlock if per_block == 2 else tv.resnet.Bottleneck
    names = blocks(model, cls)
    p = check(model, 1 + per_block * len(names))  # stem + one per conv of each block (its ReLU, called 2-3x)
    f = feeders(p)
    assert f["relu"] == "conv1"
    for b in names:
        calls = [f"{b}.relu"] + [f"{b}.relu#{k}" for k in range(2, per_block + 1)]
        assert [f[c] for c in calls] == [f"{b}.conv{k}" for k in range(1, per_block + 1)]
        assert [s.post_add for s in p.sites if s.name in calls] == [False] * (per_block - 1) + [True]
    never(p, ["fc"] + [n for n in p.all_layers if ".downsample." in n])


def test_torchvision_mobilenet_v3_small():
    tv = import_torchvision().models
    model = tv.mobilenet_v3_small(num_classes=10)
    # ReLU blocks 1-3: block 1 (no expansion) dw + its SE's squeeze, blocks 2-3 expand + dw (5 in-block);
    # Hardswish is not a site; every one of the 9 SE modules squeezes through a ReLU: 14
    p = check(model, 14)
    from torchvision.ops.misc import SqueezeExcitation

    se = blocks(model, SqueezeExcitation)
    assert sum(f == f"{b}.fc1" for b in se for f in p.layers) == len(se) == 9
    never(p, [f"{b}.fc2" for b in se] + ["classifier.0", "classifier.3"]
          + [f"{n}.block.{len(m.block) - 1}.0" for n, m in model.features.named_children() if hasattr(m, "block")])


def test_torchvision_efficientnet_b0_silu_and_squeeze_excite():
    tv = import_torchvision().models
    model = tv.efficientnet_b0(num_classes=10)
    mb = blocks(model, tv.efficientnet.MBConv)
    # stem + head + per MBConv: dw and SE squeeze, and the expand conv where the ratio is not 1 (15 of 16)
    p = check(model, 2 + 2 * len(mb) + (len(mb) - 1))
    assert all(s.kind == "silu" and s.proxy for s in p.sites)
    last = [f"{b}.block.{len(dict(model.named_modules())[b].block) - 1}.0" for b in mb]  # the linear projection
    never(p, last + [f"{b}.block.{len(dict(model.named_modules())[b].block) - 2}.fc2" for b in mb] + ["classifier.1"])


def test_torchvision_regnet_shortcut_operand_first():
    tv = import_torchvision().models
    model = tv.regnet_x_400mf(num_classes=10)
    res = blocks(model, tv.regnet.ResBottleneckBlock)
    p = check(model, 1 + 3 * len(res))  # stem + a, b and the post-add activation of each block
    f = feeders(p)
    for b in res:  # x = proj(x) + f(x): the shortcut is the first operand
        assert f[f"{b}.activation"] == f"{b}.f.c.0"
    assert sum(s.post_add for s in p.sites) == len(res)
    never(p, ["fc"] + [n for n in p.all_layers if n.endswith(".proj.0")])


def test_torchvision_shufflenet_v2():
    tv = import_torchvision().models
    model = tv.shufflenet_v2_x0_5(num_classes=10)
    units = blocks(model, tv.shufflenetv2.InvertedResidual)
    firsts = [u for u in units if u.endswith(".0")]
    p = check(model, 2 + 2 * len(units) + len(firsts))  # conv1, conv5; branch2 x2 per unit; branch1 of first units
    never(p, ["fc"] + [f"{u}.branch2.3" for u in units] + [f"{u}.branch1.0" for u in firsts])  # depthwise, no act


def test_torchvision_densenet121_concatenation_feeds_nothing():
    tv = import_torchvision().models
    model = tv.densenet121(num_classes=10)
    layers = blocks(model, tv.densenet._DenseLayer)
    transitions = blocks(model, tv.densenet._Transition)
    # stem relu0, relu1 + relu2 per dense layer, one per transition, the functional ReLU after norm5
    p = check(model, 1 + 2 * len(layers) + len(transitions) + 1, prunable=1 + len(layers))
    f = feeders(p)
    for lay in layers:
        assert f[f"{lay}.relu1"] is None  # its BN normalises a concatenation: no single layer feeds it
        assert f[f"{lay}.relu2"] == f"{lay}.conv1"
    assert f["relu()"] is None and f["features.relu0"] == "features.conv0"
    never(p, [f"{lay}.conv2" for lay in layers] + [f"{t}.conv" for t in transitions] + ["classifier"])


def test_torchvision_convnext_gelu_after_permute_and_layernorm():
    tv = import_torchvision().models
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)
    cn = blocks(model, tv.convnext.CNBlock)
    p = check(model, len(cn))
    assert p.layers == [f"{b}.block.3" for b in cn]  # the first pointwise Linear of each block
    never(p, [f"{b}.block.0" for b in cn] + [f"{b}.block.5" for b in cn] + ["classifier.2", "features.0.0"])


def test_torchvision_vit_attention_never_prunable():
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    p = check(model, 2)
    enc = "encoder.layers.encoder_layer_"
    assert p.layers == [f"{enc}{i}.mlp.0" for i in range(2)]
    never(p, [f"{enc}{i}.self_attention.out_proj" for i in range(2)] + [f"{enc}{i}.mlp.3" for i in range(2)]
          + ["heads.head", "conv_proj"])


def test_torchvision_swin_channel_last_tokens():
    tv = import_torchvision().models
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10)
    sb = blocks(model, tv.swin_transformer.SwinTransformerBlock)
    p = check(model, len(sb))  # channels (N, H, W, C): the neuron is C, the MLP's hidden width
    assert p.layers == [f"{b}.mlp.0" for b in sb]
    never(p, [f"{b}.attn.{w}" for b in sb for w in ("qkv", "proj")] + [f"{b}.mlp.3" for b in sb] + ["head"])


# ---- timm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, se", [("resnet18", False), ("seresnet18", True)])
def test_timm_resnet_and_squeeze_excite(arch, se):
    t = import_timm()
    model = t.create_model(arch, num_classes=10)
    names = blocks(model, t.models.resnet.BasicBlock)
    p = check(model, 1 + (3 if se else 2) * len(names))
    f = feeders(p)
    for b in names:
        assert f[f"{b}.act1"] == f"{b}.conv1" and f[f"{b}.act2"] == f"{b}.conv2"  # act2: after SE and the add
        if se:
            assert f"{b}.se.fc1" in p.layers
    never(p, ["fc"] + [n for n in p.all_layers if ".downsample." in n or n.endswith("se.fc2")])


def test_timm_efficientnet_activation_inside_batchnorm_module():
    t = import_timm()
    model = t.create_model("efficientnet_b0", num_classes=10)
    p = check(model, 49)  # as torchvision's: stem, head, 16 dw, 16 SE squeezes, 15 expansions
    assert {n.rsplit(".", 1)[-1] for n in p.layers} == {"conv_stem", "conv_head", "conv_dw", "conv_reduce", "conv_pw"}
    never(p, ["classifier"] + [n for n in p.all_layers if n.endswith(("conv_pwl", "conv_expand"))])


def test_timm_convnext_vit_mixer():
    t = import_timm()
    from timm.models.mlp_mixer import MlpMixer

    convnext = check(t.create_model("convnext_atto", num_classes=10), 2 + 2 + 6 + 2)
    assert all(n.endswith("mlp.fc1") for n in convnext.layers)
    never(convnext, [n for n in convnext.all_layers if n.endswith(("conv_dw", "mlp.fc2")) or "downsample" in n]
          + ["head.fc", "stem.0"])
    vit = check(t.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10), 2)
    assert vit.layers == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    never(vit, [f"blocks.{i}.attn.{w}" for i in range(2) for w in ("qkv", "proj")] + ["head", "patch_embed.proj"])
    mixer = check(MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32), 4)
    assert mixer.layers == [f"blocks.{i}.{m}.fc1" for i in range(2) for m in ("mlp_tokens", "mlp_channels")]
    never(mixer, [f"blocks.{i}.{m}.fc2" for i in range(2) for m in ("mlp_tokens", "mlp_channels")] + ["head"])
