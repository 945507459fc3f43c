"""egp_deploy.prune.Pruner: EGP inside a hand-written training loop on a model defined here.

The model uses none of the usual module names (no "downsample"/"shortcut": a walk that tells the
shortcut by its name takes block2's projection for the branch), registers its projection before the branch and the
squeeze-excite convs after it (registration order would hand block2's post-add ReLU the gate's
expand conv), and has a functional ReLU, token attention (q/k/v/o Linears) and a GELU MLP. Expected sites and
feeders are read off the class by hand; entropies are checked against pre-activations captured
by plain forward hooks, and against egp-prune's own log on the same weights.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_deploy.data import load_digits_bundle, make_loader
from egp_deploy.errors import DataError, UnsupportedError, UsageError
from egp_deploy.prune import Pruner
from egp_deploy.prune.entropy import SiteCounts, region_counts, stats_from_counts


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, excite: bool) -> None:
        super().__init__()
        # the projection first: "the last conv registered before the activation" would be the branch's
        self.side = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())
        self.a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.na = nn.BatchNorm2d(cout)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.nb = nn.BatchNorm2d(cout)
        self.excite = Excite(cout) if excite else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.na(self.a(x)))
        y = self.excite(self.nb(self.b(y)))
        return self.act(self.side(x) + y)  # the shortcut is the FIRST operand


class Excite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c, c // 4, 1)
        self.expand = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return x * gate


class Mixer(nn.Module):
    """Single-head attention over tokens and a GELU MLP, both residual, channel-last (N, L, C)."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.up, self.down = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.n1(t)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1)
        t = t + self.o(att @ self.v(h))
        return t + self.down(F.gelu(self.up(self.n2(t))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_act = nn.ReLU(inplace=True)
        self.block1 = Residual(8, 8, 1, excite=False)
        self.block2 = Residual(8, 16, 2, excite=True)
        self.mix = Mixer(16, 32)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem_act(self.stem_bn(self.stem(x)))))
        t = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (N, 64, 16) tokens
        return self.head(self.mix(t).mean(1))


EXPECTED = [  # (site, kind, feeder, post_add)
    ("stem_act", "relu", "stem", False),
    ("block1.relu()", "relu", "block1.a", False),
    ("block1.act", "relu", "block1.b", True),
    ("block2.relu()", "relu", "block2.a", False),
    ("block2.excite.relu()", "relu", "block2.excite.squeeze", False),
    ("block2.act", "relu", "block2.b", True),  # through the squeeze-excite gate and the BN
    ("mix.gelu()", "gelu", "mix.up", False),
]
NEVER = {"block2.side.0", "block2.excite.expand", "mix.q", "mix.k", "mix.v", "mix.o", "mix.down", "head"}


@pytest.fixture(scope="module")
def digits():
    b = load_digits_bundle()
    train = [batch for _, batch in zip(range(4), make_loader(b.train, 64, shuffle=True, seed=0))]
    calib = [batch for _, batch in zip(range(3), make_loader(b.val, 64))]
    return train, calib


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def example() -> torch.Tensor:
    return torch.zeros(2, 1, 32, 32)


def nonzero(model: nn.Module, layer: str) -> int:
    return int((dict(model.named_parameters())[f"{layer}.weight"] != 0).sum())


def test_sites_and_feeders_from_structure():
    pruner = Pruner(net(), example())
    assert pruner.discovery.method == "fx"
    assert [(s.name, s.kind, s.feeder, s.post_add) for s in pruner.sites] == EXPECTED
    assert pruner.layers == [f for _, _, f, _ in EXPECTED]
    assert not NEVER & set(pruner.layers)
    assert set(pruner.all_layers) - set(pruner.layers) == NEVER


def test_module_called_twice_is_two_sites():
    class Shared(nn.Module):  # torchvision's ResNet blocks share one ReLU module
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.c2(self.relu(self.c1(x))))

    model = Shared()
    pruner = Pruner(model, example())
    assert [(s.name, s.feeder, s.call) for s in pruner.sites] == [("relu", "c1", 0), ("relu#2", "c2", 1)]
    x = torch.randn(4, 1, 32, 32)
    stats = pruner.measure([x])
    assert stats["relu"].channels == stats["relu#2"].channels == 4
    pre1 = model.c1(x)
    assert torch.equal(stats["relu"].counts, region_counts(pre1, "relu"))
    assert torch.equal(stats["relu#2"].counts, region_counts(model.c2(torch.relu(pre1)), "relu"))


def test_entropies_equal_pre_activations_seen_by_hooks(digits):
    """The probe graph's counts against pre-activations captured by plain forward hooks."""
    _, calib = digits
    model = net()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
    pruner = Pruner(model, example())
    stats = pruner.measure(calib)
    producers = {"stem_act": "stem_bn", "block1.relu()": "block1.na", "block2.relu()": "block2.na",
                 "block2.excite.relu()": "block2.excite.squeeze", "mix.gelu()": "mix.up"}
    seen: dict[str, SiteCounts] = {}
    modules = dict(model.named_modules())

    def hook(site, kind):
        def f(_m, _args, out):
            c = region_counts(out, kind)
            seen.setdefault(site, SiteCounts(kind, torch.zeros_like(c))).counts.add_(c)
        return f

    handles = [modules[p].register_forward_hook(hook(s, "gelu" if "gelu" in s else "relu")) for s, p in producers.items()]
    model.eval()
    with torch.no_grad():
        for x, _ in calib:
            model(x)
    for h in handles:
        h.remove()
    expected = stats_from_counts(seen)
    for site in producers:
        assert torch.equal(stats[site].counts, expected[site].counts), site
        assert stats[site].entropy == expected[site].entropy
    assert 0.0 < stats["block1.relu()"].entropy <= 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_hand_written_training_loop(digits, optimizer):
    train, calib = digits
    model = net()
    pruner = Pruner(model, example(), method="egp", rate=0.5)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    total = sum(dict(model.named_parameters())[f"{l}.weight"].numel() for l in pruner.layers)
    for it in range(1, 4):
        pruner.measure(calib)
        before = {l: nonzero(model, l) for l in pruner.layers}
        info = pruner.step()
        # sparsity per iteration is what the allocation says, layer by layer
        for l in pruner.layers:
            assert before[l] - nonzero(model, l) == info["prune"][l], (it, l)
        assert sum(info["prune"].values()) > 0
        model.train()
        for x, y in train:  # the user's own loop: nothing of egp-deploy in it
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        params = dict(model.named_parameters())
        for key, mask in pruner.masks.items():
            assert not params[key][~mask].any(), (it, key)
            assert params[key][mask].ne(0).any() or not mask.any()
            for v in opt.state[params[key]].values():
                if isinstance(v, torch.Tensor) and v.shape == mask.shape:
                    assert not v[~mask].any()  # momentum / Adam moments of pruned weights are zero too
        summary = pruner.summary()
        pruned = sum(total_l - nz for total_l, nz in (
            (params[f"{l}.weight"].numel(), nonzero(model, l)) for l in pruner.layers))
        assert summary["sparsity_prunable"] == pytest.approx(pruned / total)
        assert summary["iteration"] == it
        # shortcut, classifier, attention projections and the second MLP linear are never touched
        assert all(bool(params[f"{l}.weight"].ne(0).all()) for l in NEVER)
    assert set(summary["all_zero_layers"]) <= set(pruner.layers)
    pruner.remove()
    opt.zero_grad()
    F.cross_entropy(model(train[0][0]), train[0][1]).backward()
    opt.step()  # hooks detached: the optimizer moves pruned weights again
    assert any(bool(dict(model.named_parameters())[k][~m].any()) for k, m in pruner.masks.items())


def test_masks_hold_under_torch_compile_and_grad_scaler(digits):
    train, calib = digits
    torch.manual_seed(0)  # small: compiling costs seconds per module
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(288, 32), nn.ReLU(), nn.Linear(32, 10))
    with Pruner(model, torch.zeros(2, 1, 32, 32), rate=0.7) as pruner:
        pruner.measure(calib)
        pruner.step()
        assert pruner.layers == ["1", "5"]
        compiled = torch.compile(model, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        scaler = torch.amp.GradScaler("cpu")
        for x, y in train[:2]:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(compiled(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        params = dict(model.named_parameters())
        assert all(not params[k][~m].any() for k, m in pruner.masks.items())
        assert any(bool((~m).any()) for m in pruner.masks.values())


def test_imp_prunes_every_weight_layer_globally(digits):
    _, calib = digits
    model = net()
    pruner = Pruner(model, example(), method="imp", rate=0.5)
    info = pruner.step()  # IMP needs no measurement
    total = sum(m.numel() for m in pruner.masks.values())
    assert info["prune_total"] == round(0.5 * total)
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == info["prune_total"]
    assert set(pruner.masks) == {f"{l}.weight" for l in pruner.all_layers}


def test_state_dict_resumes_exactly(digits):
    train, calib = digits
    model = net()
    pruner = Pruner(model, example(), rate=0.5)
    pruner.measure(calib)
    pruner.step()
    pruner.measure(calib)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = net(seed=1)
    twin.load_state_dict(saved["model"])
    resumed = Pruner(twin, example(), rate=0.5)
    resumed.load_state_dict(saved["pruner"])
    assert resumed.iteration == 1 and resumed.stats.keys() == pruner.stats.keys()
    assert all(torch.equal(resumed.masks[k], pruner.masks[k]) for k in pruner.masks)
    a, b = pruner.step(), resumed.step()  # no new measurement needed: the saved one is fresh
    assert a == b
    assert all(torch.equal(resumed.masks[k], pruner.masks[k]) for k in pruner.masks)
    with pytest.raises(UsageError, match="rate"):
        Pruner(copy.deepcopy(twin), example(), rate=0.3).load_state_dict(saved["pruner"])
    pruner.remove(), resumed.remove()


def test_pruner_entropies_equal_egp_prune_log(tmp_path):
    """The built-in loop's iteration-0 entropies (egp-prune's log) from the same weights and data."""
    from egp_deploy.archs import create_model
    from egp_deploy.checkpoint import checkpoint_from_model
    from egp_deploy.data import load_data
    from egp_deploy.prune.loop import PruneConfig, run_pruning

    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "width": 4}
    model = create_model("resnet18", **kw)
    bundle = load_data("digits")
    ckpt = checkpoint_from_model(model, "resnet18", kw, bundle.input_shape, 10, {"data": "digits"})
    run = run_pruning(ckpt, bundle, PruneConfig(iterations=0, calibration_batches=1), tmp_path / "run", progress=False)
    stats = Pruner(model, example()).measure(make_loader(bundle.val, 256), max_batches=1)
    assert run.log["iterations"][0]["entropy"] == {k: v.entropy for k, v in stats.items()}
    assert run.log["sites"] == [s.to_json() for s in Pruner(model, example()).sites]


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -0.5, 0.0, 1.0, "0.5"])
def test_bad_rate_is_refused(rate):
    with pytest.raises(UsageError, match="rate") as e:
        Pruner(net(), example(), rate=rate)
    assert e.value.exit_code == 2


def test_bad_arguments_are_refused_before_work(digits):
    with pytest.raises(UsageError, match="method must be egp or imp"):
        Pruner(net(), example(), method="magnitude")
    with pytest.raises(UsageError, match="entropy_mode"):
        Pruner(net(), example(), entropy_mode="mean")
    with pytest.raises(DataError, match="example_inputs do not run") as e:
        Pruner(net(), torch.zeros(2, 3, 32, 32))  # 3 channels into a 1-channel stem
    assert e.value.exit_code == 4
    with pytest.raises(UnsupportedError, match="no activation sites") as e:
        Pruner(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4))
    assert e.value.exit_code == 8
    with pytest.raises(UsageError, match="Module"):
        Pruner(lambda x: x, example())
    pruner = Pruner(net(), example())
    with pytest.raises(UsageError, match="measure"):
        pruner.step()
    with pytest.raises(DataError, match="no calibration batches"):
        pruner.measure([])


def test_pruned_model_exports_as_pt2_through_deploy(digits, tmp_path):
    """torch.export .pt2 of the pruned model through egp_deploy.deploy: export, surgery, verification."""
    import egp_deploy as egp

    train, calib = digits
    model = net()
    with Pruner(model, example(), rate=0.5) as pruner:
        for _ in range(2):
            pruner.measure(calib)
            pruner.step()
    model.eval()
    program = torch.export.export(model, (torch.zeros(1, 1, 32, 32),))
    path = tmp_path / "pruned.pt2"
    torch.export.save(program, path)
    job = egp.deploy(path, tmp_path / "pruned.egp.onnx", calibration="digits", samples=32, plot=False)
    assert job.paths.surgered.is_file() and job.surgery is not None
    assert job.report["export"]["max_rel_error_vs_torch"] <= 1e-4
    verification = job.surgery.report["verification"]
    assert verification["exact_rewrites_pass"] and verification["calibration"]["rel_error"] <= verification["tolerance"]


DDP_SCRIPT = """
import json, sys
import torch, torch.distributed as dist, torch.nn as nn
from egp_deploy.prune import Pruner

dist.init_process_group("gloo")  # the user's own set-up: the Pruner finds the process group
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14 * 14, 12),
                      nn.ReLU(), nn.Linear(12, 10))
data = torch.load(sys.argv[1])
pruner = Pruner(model, data[:1], rate=0.5)
stats = pruner.measure([data[i:i + 5] for i in range(rank * 5, len(data), 5 * world)])  # this rank's shard
pruner.step()
if rank == 0:
    json.dump({"entropy": {k: v.entropy for k, v in stats.items()},
               "counts": {k: v.counts.tolist() for k, v in stats.items()},
               "masks": {k: m.flatten().tolist() for k, m in pruner.masks.items()}}, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def test_counts_are_summed_over_ranks_under_torchrun(tmp_path):
    import json
    import os
    import subprocess
    import sys

    torch.manual_seed(1)
    data = torch.randn(20, 1, 16, 16)
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "user.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "user.py"), str(tmp_path / "data.pt"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14 * 14, 12),
                          nn.ReLU(), nn.Linear(12, 10))
    single = Pruner(model, data[:1], rate=0.5)
    stats = single.measure([data[i:i + 5] for i in range(0, 20, 5)])  # one process, all the data
    single.step()
    assert got["counts"] == {k: v.counts.tolist() for k, v in stats.items()}
    assert got["entropy"] == {k: v.entropy for k, v in stats.items()}
    assert got["masks"] == {k: m.flatten().tolist() for k, m in single.masks.items()}
    single.remove()


def test_wrappers_are_unwrapped_and_a_submodule_named_module_is_not():
    from egp_deploy.prune.pruner import unwrap

    class Holder(nn.Module):  # a user's model may well call a submodule "module"
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.module(x)

    holder = Holder()
    assert unwrap(holder) is holder
    assert unwrap(nn.DataParallel(holder)) is holder
    assert unwrap(torch.compile(holder, backend="eager")) is holder  # compiles nothing until called
    assert Pruner(holder, torch.zeros(1, 4)).layers == ["module.0"]


def test_functional_activation_spellings():
    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.ModuleList(nn.Linear(6, 6) for _ in range(8))

        def forward(self, x):
            l = self.l
            x = F.relu6(l[0](x))
            x = F.hardtanh(l[1](x), 0.0, 6.0)
            x = F.hardtanh(l[2](x), -1.0, 1.0)  # not rectifier-like: no site
            x = F.leaky_relu(l[3](x), 0.1)
            x = l[4](x).relu_()
            x = torch.relu_(l[5](x))
            x = F.silu(l[6](x))
            return F.gelu(F.dropout(l[7](x), 0.1, self.training))

    sites = Pruner(Spellings(), torch.zeros(2, 6)).sites
    assert [(s.name, s.kind, s.feeder) for s in sites] == [
        ("relu6()", "relu6", "l.0"), ("hardtanh()", "relu6", "l.1"), ("leaky_relu()", "leaky_relu", "l.3"),
        ("relu_()", "relu", "l.4"), ("relu_()#2", "relu", "l.5"), ("silu()", "silu", "l.6"),
        ("gelu()", "gelu", "l.7")]


def test_untraceable_model_found_with_torch_export():
    class ShapeBranch(nn.Module):  # a Python branch on a traced shape: fx cannot trace it, torch.export can
        def __init__(self):
            super().__init__()
            self.side = nn.Conv2d(1, 4, 1)  # registered before the branch
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.act1, self.act2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            if x.shape[-1] > 8:
                x = F.avg_pool2d(x, 2)
            return self.act2(self.side(x) + self.b(self.act1(self.a(x))))

    model = ShapeBranch()
    pruner = Pruner(model, torch.zeros(1, 1, 16, 16))
    assert pruner.discovery.method == "export" and "fx cannot trace ShapeBranch" in pruner.discovery.note
    assert [(s.name, s.feeder, s.post_add) for s in pruner.sites] == [("act1", "a", False), ("act2", "b", True)]
    stats = pruner.measure([torch.randn(3, 1, 16, 16)])
    assert stats["act2"].channels == 4


def test_package_swin_measured_per_hidden_channel():
    """Swin's MLP runs on channel-last (N, H, W, C) maps: a neuron is C, not a row of the token grid."""
    from egp_deploy.archs import create_model

    model = create_model("swin_t", num_classes=10, in_channels=1, width=12, depths=(2, 2), heads=(3, 6))
    pruner = Pruner(model, torch.zeros(1, 1, 32, 32))
    assert pruner.discovery.method == "export"
    stats = pruner.measure([torch.randn(2, 1, 32, 32)])
    assert [stats[s.name].channels for s in pruner.sites] == [48, 48, 96, 96]  # 4 x width per stage
