"""crop_dead_taps: all-zero border taps of a kernel go, the padding shrinks to match, outputs stay exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from egp_deploy.surgery.dead_taps import crop_dead_taps
from egp_deploy.surgery.pipeline import SurgeryOptions, optimize
from test_surgery_helpers import apply, export_module, outputs, randn, rel_error


def _conv(weight_mask: np.ndarray, **kw) -> nn.Module:
    """A Conv2d (or Conv1d for a 3-D mask) with random weights, zeroed where ``weight_mask`` is False."""
    torch.manual_seed(0)
    cls = nn.Conv2d if weight_mask.ndim == 4 else nn.Conv1d
    conv = cls(weight_mask.shape[1] * kw.get("groups", 1), weight_mask.shape[0], weight_mask.shape[2:], **kw)
    with torch.no_grad():
        conv.weight.mul_(torch.from_numpy(weight_mask.astype(np.float32)))
    return conv.eval()


def _taps(cout: int, cin: int, rows: list[str]) -> np.ndarray:
    """A mask whose kernel taps are ON where ``rows`` has '1' (the same taps in every filter)."""
    taps = np.array([[c == "1" for c in r] for r in rows])
    return np.broadcast_to(taps, (cout, cin, *taps.shape)).copy()


def _crop(module: nn.Module, shape: tuple[int, ...]):
    model = export_module(module, shape)
    out, recs = apply(model, crop_dead_taps)
    x = randn(*shape, seed=3)
    return out, recs, rel_error(outputs(model, x), outputs(out, x))


def test_centre_only_3x3_becomes_1x1_without_padding():
    out, recs, err = _crop(_conv(_taps(6, 4, ["000", "010", "000"]), padding=1), (2, 4, 9, 9))
    assert err <= 1e-6
    assert [(r["kernel_after"], r["pads_after"]) for r in recs] == [([1, 1], [0, 0, 0, 0])]
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    w = next(i for i in out.graph.initializer if i.name == conv.input[1])
    assert list(w.dims) == [6, 4, 1, 1]


@pytest.mark.parametrize("stride", [1, 2])
def test_one_sided_crop_shifts_the_padding_exactly(stride):
    # top row and left column dead: a 2x2 kernel whose padding is kept only at the bottom and right
    out, recs, err = _crop(_conv(_taps(3, 2, ["000", "011", "011"]), padding=1, stride=stride), (1, 2, 8, 7))
    assert err <= 1e-6
    assert recs[0]["kernel_after"] == [2, 2] and recs[0]["pads_after"] == [0, 0, 1, 1]


def test_taps_the_padding_cannot_absorb_are_kept():
    # no padding: cropping would change the output size, so the kernel must stay as it is
    out, recs, _ = _crop(_conv(_taps(3, 2, ["000", "010", "000"]), padding=0), (1, 2, 8, 8))
    assert recs == []
    # padding 1 but two dead rows at the top: only one of them can go
    out, recs, err = _crop(_conv(_taps(3, 2, ["00000", "00000", "11111", "11111", "11111"]), padding=1), (1, 2, 9, 9))
    assert err <= 1e-6 and recs[0]["kernel_after"] == [4, 5] and recs[0]["pads_after"] == [0, 1, 1, 1]


def test_dilated_depthwise_and_1d_kernels_crop_exactly():
    _, recs, err = _crop(_conv(_taps(4, 1, ["000", "010", "000"]), padding=2, dilation=2, groups=4), (1, 4, 10, 10))
    assert err <= 1e-6 and recs[0]["kernel_after"] == [1, 1] and recs[0]["pads_after"] == [0, 0, 0, 0]
    mask = np.zeros((3, 2, 5), bool)
    mask[:, :, 1:4] = True
    _, recs, err = _crop(_conv(mask, padding=2), (1, 2, 11))
    assert err <= 1e-6 and recs[0]["kernel_after"] == [3] and recs[0]["pads_after"] == [1, 1]


def test_a_filter_using_a_border_tap_keeps_it():
    mask = _taps(3, 2, ["000", "010", "000"])
    mask[1, 0, 0, 2] = True  # one weight in the top-right corner of one filter
    _, recs, err = _crop(_conv(mask, padding=1), (1, 2, 6, 6))
    assert err <= 1e-6 and recs[0]["kernel_after"] == [2, 2] and recs[0]["pads_after"] == [1, 0, 0, 1]


def test_all_zero_and_full_kernels_are_left_alone():
    for mask in (np.zeros((3, 2, 3, 3), bool), np.ones((3, 2, 3, 3), bool)):
        _, recs, _ = _crop(_conv(mask, padding=1), (1, 2, 6, 6))
        assert recs == []


def test_optimize_crops_and_reports_then_merges_the_new_1x1():
    # conv 3x3 (centre only) then conv 3x3: once cropped to 1x1 the pair merges into one conv (exact)
    net = nn.Sequential(_conv(_taps(8, 3, ["000", "010", "000"]), padding=1), _conv(np.ones((4, 8, 3, 3), bool), padding=1))
    model = export_module(net, (1, 3, 12, 12))
    x, held = randn(16, 3, 12, 12, seed=1)[:1], randn(1, 3, 12, 12, seed=2)
    res = optimize(model, x, held, SurgeryOptions(batch_size=1))
    assert res.report["summary"]["kernels_cropped"] == 1
    assert res.report["changes"]["dead_taps"][0]["kernel_after"] == [1, 1]
    assert res.report["after"]["conv_gemm_layers"] == 1 and res.report["after"]["macs_dense"] < res.report["before"]["macs_dense"]
    assert rel_error(outputs(model, held), outputs(res.model, held)) <= 1e-5
