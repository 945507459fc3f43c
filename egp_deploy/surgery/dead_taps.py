"""Dead kernel taps, cropped (exact): unstructured sparsity that empties a kernel's border.

When every filter of a Conv has zeros in its first (or last) kernel rows/columns, those taps read
only zeros' worth of input, so the kernel can be cropped if the padding on that side shrinks by
the same span: cropping t leading taps (dilation d) moves each window's first tap t*d positions
right, which a begin-padding reduced by t*d reproduces exactly; output sizes are unchanged. A 3x3
pad-1 conv whose only nonzero taps are central becomes a 1x1 conv, which the merges can then fuse.
Cropping is limited to what the padding allows (ONNX pads cannot be negative).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from egp_deploy.surgery._graph import conv_attrs, conv_weights, set_conv_attrs, set_conv_weights


def _zero_run(used: np.ndarray) -> tuple[int, int]:
    """(leading, trailing) count of False entries in a 1-D tap-usage vector."""
    nz = np.flatnonzero(used)
    return int(nz[0]), int(len(used) - 1 - nz[-1])


def crop_dead_taps(graph: gs.Graph, module_of: Callable[[str], str | None] = lambda n: None) -> list[dict[str, Any]]:
    """Crop all-zero border taps of every Conv kernel, reducing its padding to match (exact).

    Returns one record per cropped Conv: node, module, kernel before/after and pads before/after.
    """
    records: list[dict[str, Any]] = []
    for node in list(graph.nodes):
        if node.op != "Conv":
            continue
        wb = conv_weights(node)
        if wb is None:
            continue
        w, b = wb
        attrs = conv_attrs(node, w.shape)
        nd = w.ndim - 2
        if attrs is None or not w.any() or len(attrs["pads"]) != 2 * nd:
            continue  # SAME padding depends on the input size; an all-zero conv is a constant layer's job
        begin, end, dil = list(attrs["pads"][:nd]), list(attrs["pads"][nd:]), attrs["dilations"]
        slices, crop = [slice(None), slice(None)], False
        for d in range(nd):
            other_axes = tuple(a for a in range(w.ndim) if a != d + 2)
            lead, trail = _zero_run(np.any(w != 0, axis=other_axes))
            lead = min(lead, begin[d] // dil[d])
            trail = min(trail, end[d] // dil[d])
            begin[d] -= lead * dil[d]
            end[d] -= trail * dil[d]
            slices.append(slice(lead, w.shape[d + 2] - trail))
            crop |= bool(lead or trail)
        if not crop:
            continue
        cropped = np.ascontiguousarray(w[tuple(slices)])
        before = {"kernel": list(attrs["kernel"]), "pads": list(attrs["pads"])}
        attrs.update(kernel=list(cropped.shape[2:]), pads=begin + end)
        set_conv_attrs(node, attrs)
        set_conv_weights(node, cropped, b)
        records.append({"node": node.name, "module": module_of(node.name), "kernel_before": before["kernel"],
                        "kernel_after": attrs["kernel"], "pads_before": before["pads"], "pads_after": attrs["pads"]})
    return records
