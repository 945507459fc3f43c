"""The surgery report: a JSON-able dict, a terminal table (rich) and a before/after PNG."""

from __future__ import annotations

import ast
import json
from typing import Any, Callable

import onnx

METRIC_ROWS = [  # (key in graph_metrics, label)
    ("nodes", "nodes"),
    ("conv_gemm_layers", "conv/gemm layers"),
    ("activations", "activations"),
    ("longest_path", "longest path (conv/gemm layers)"),
    ("params", "parameters"),
    ("params_nonzero", "parameters (nonzero)"),
    ("macs", "MACs (dense)"),
    ("macs_nonzero", "MACs (nonzero weights)"),
    ("file_bytes", "file size (bytes)"),
]


def module_name_from_node(node_name: str) -> str | None:
    """'/layer2/layer2.0/downsample/downsample.0/Conv' -> 'layer2.0.downsample.0' (torch legacy
    exporter scopes: each scope is named relative to its parent's own scope name)."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/") if p][:-1]
    current, prev = "", ""
    for comp in parts:
        if prev and comp.startswith(prev + "."):  # 'features.1' then 'features.1.0' (nested Sequential)
            current = current[: len(current) - len(prev)] + comp
        else:
            current = f"{current}.{comp}" if current else comp
        prev = comp
    return current or None


def module_namer(model: onnx.ModelProto) -> Callable[[str], str | None]:
    """node name -> PyTorch module name, from metadata 'egp.node_modules' when present, else parsed."""
    mapping: dict[str, str] = {}
    for prop in model.metadata_props:
        if prop.key == "egp.node_modules":
            try:
                mapping = {str(k): str(v) for k, v in json.loads(prop.value).items()}
            except (ValueError, AttributeError):
                mapping = {}

    scoped = {}  # the dynamo exporter's per-node scopes: [..., 'features.1.0.mlp.0', 'linear']
    for n in model.graph.node:
        for prop in n.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes" and n.name:
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                    scoped[n.name] = str(scopes[-2])

    def name_of(node: str) -> str | None:
        return mapping.get(node) or scoped.get(node) or module_name_from_node(node)

    return name_of


def _metric(metrics: dict[str, Any], key: str) -> Any:
    aliases = {
        "conv_gemm_layers": ("conv_gemm_layers", "layers", "conv_layers"),
        "params": ("params", "parameters", "params_all"),
        "params_nonzero": ("params_nonzero", "parameters_nonzero", "nonzero_params"),
        "macs": ("macs_dense", "macs"),
        "macs_nonzero": ("macs_nonzero", "macs_sparse"),
        "file_bytes": ("file_size_bytes", "file_bytes", "file_size"),
        "longest_path": ("longest_path_layers", "longest_path", "depth"),
    }.get(key, (key,))
    for k in aliases:
        if k in metrics:
            return metrics[k]
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def print_report(report: dict[str, Any], console=None) -> None:
    """Before/after table, what was removed, and the verification verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True)  # a line stays one line, whatever the width
    before, after = report.get("before", {}), report.get("after", {})
    table = Table(title="graph surgery", show_lines=False)
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label in METRIC_ROWS:
        b, a = _metric(before, key), _metric(after, key)
        change = "-"
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b:
            change = f"{(a - b) / b * 100:+.1f} %"
        if key.startswith("macs") and (before.get("macs_unknown_nodes") or after.get("macs_unknown_nodes")):
            # layers whose shapes are unknown are left out of the sum: not comparable
            cells = [_fmt(v) + (f" + {len(m['macs_unknown_nodes'])} unknown" if m.get("macs_unknown_nodes") else "")
                     for v, m in ((b, before), (a, after))]
            table.add_row(label, *cells, "-")
            continue
        table.add_row(label, _fmt(b), _fmt(a), change)
    summary = report.get("summary", {})
    dd = summary.get("data_dependent_held_out_error")
    if dd is not None:  # what the data-dependent strips cost on data they were not measured on
        bound = summary.get("max_data_dependent_error")
        table.add_row("held-out rel. error (data-dependent)", "0", f"{dd:.2e}",
                      "-" if bound is None else f"bound {bound:g}")
    console.print(table)
    for w in report.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    removed = report.get("layers_removed") or []
    if removed:
        console.print(f"[bold]conv/gemm layers removed:[/] {len(removed)}: {', '.join(removed)}", soft_wrap=True)
    exact = report.get("activations_removed_exact") or []
    if exact:
        console.print(f"[bold]activations removed (exact, relu(relu(x)+c) = relu(x+min(c,0))+max(c,0)):[/] "
                      f"{len(exact)}: {', '.join(exact)}", soft_wrap=True)
    lists = report.get("changes", {})
    for key, title in (("stripped", "activations stripped (data-dependent)"),
                       ("reverted_strips", "data-dependent strips reverted"),
                       ("constant_layers", "constant layers folded"),
                       ("dead_channels", "channel groups narrowed"),
                       ("dead_taps", "kernels cropped to their nonzero taps"),
                       ("mlp_units", "token MLPs narrowed"),
                       ("linearized", "smooth activations linearized (NOT exact)"),
                       ("merged", "linear layers merged"),
                       ("dropped_merges", "inexact merges dropped")):
        items = lists.get(key, [])
        if not items:
            continue
        console.print(f"[bold]{title}:[/] {len(items)}")
        for it in items[:12]:
            console.print("  " + _describe(key, it), soft_wrap=True)
        if len(items) > 12:
            console.print(f"  ... and {len(items) - 12} more (see the JSON report)")
    smooth = [a for a in report.get("activations", []) if a.get("smooth")]
    if smooth:
        shown = ", ".join(f"{a.get('module') or a['node']} ({a['kind']}) {a['entropy']:.2f}" for a in smooth[:12])
        more = f" ... and {len(smooth) - 12} more" if len(smooth) > 12 else ""
        console.print(f"[bold]smooth activations (entropy, ON = pre-activation > 0; kept):[/] {len(smooth)}: "
                      f"{shown}{more}", soft_wrap=True)
    v = report.get("verification", {})
    lin = v.get("linearized_smooth")
    if lin:
        console.print(f"[yellow]{lin['sites']} smooth activations linearized (inexact): rel. error "
                      f"{lin['calibration_rel_error']:.2e} on calibration"
                      + (f", {lin['held_out_rel_error']:.2e} on held-out" if lin.get("held_out_rel_error") is not None
                         else "") + "[/]")
    for split in ("calibration", "held_out"):
        r = v.get(split)
        if r:
            top1 = "-" if r.get("top1_agreement") is None else f"{r['top1_agreement'] * 100:.2f} %"
            console.print(f"verification on {split} ({r.get('samples')} samples): rel. error "
                          f"{r.get('rel_error'):.2e}, top-1 agreement {top1}")
    if v.get("note"):
        console.print(f"[yellow]{v['note']}[/]")


def _describe(key: str, it: dict[str, Any]) -> str:
    if key == "stripped":
        return f"{it.get('module') or it['node']} ({it['op']}): {it['action']}"
    if key == "reverted_strips":
        left = "" if it.get("channels_left_region") is None else \
            f" ({it['channels_left_region']} of {it['channels_stripped']} channels left their calibration region)"
        return f"{it.get('module') or it['node']} ({it['op']}): {it['why']}{left}"
    if key == "constant_layers":
        mods = list(dict.fromkeys(it.get("folded_modules") or []))  # a GELU's Erf arithmetic is 5 nodes of one module
        into = "".join(f"; {c['concat']}: {c['channels_before']} -> {c['channels_after']} channels, the constant "
                       f"slice absorbed by {', '.join(c.get('reader_modules') or c['readers'])}" for c in it.get("concats") or [])
        return f"{it.get('module') or it['producer']} -> constant; folded: {', '.join(mods)}{into}"
    if key == "dead_channels":
        groups = "".join(f"; {g0} -> {g1} conv groups" for g0, g1 in (it.get("conv_groups") or {}).values())
        return (f"{', '.join(it['modules'])}: {it['channels_before']} -> {it['channels_after']} channels "
                f"({it['constant']} constant, {it['unused']} unused){groups}")
    if key == "dead_taps":
        k0, k1 = ("x".join(map(str, it[k])) for k in ("kernel_before", "kernel_after"))
        return f"{it.get('module') or it['node']}: kernel {k0} -> {k1}, pads {it['pads_before']} -> {it['pads_after']}"
    if key == "linearized":
        return (f"{it.get('module') or it['node']} ({it['kind']}): {it['on']} ON channels -> x, "
                f"{it['off']} OFF channels -> 0")
    if key == "mlp_units":
        return (f"{' + '.join(it['modules'])}: {it['units_before']} -> {it['units_after']} hidden units "
                f"({it['constant']} constant, {it['unused']} unused)")
    if key == "dropped_merges":
        held = "" if it.get("held_out_rel_error") is None else f", {it['held_out_rel_error']:.2e} held-out"
        return f"{' + '.join(it['modules'])} ({it['kind']}): rel. error {it['calibration_rel_error']:.2e}{held}: {it['why']}"
    if key == "merged":
        return f"{' + '.join(it['modules'])}: {it['kind']}"
    return json.dumps(it)


def save_report_plot(report: dict[str, Any], path) -> None:
    """Grouped bars: each metric after surgery as a share of before (PNG, Agg backend)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay untouched

    from egp_deploy.io_utils import atomic_path

    before, after = report.get("before", {}), report.get("after", {})
    labels, ratios, texts = [], [], []
    for key, label in METRIC_ROWS:
        b, a = _metric(before, key), _metric(after, key)
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b:
            labels.append(label)
            ratios.append(a / b)
            texts.append(f"{_fmt(b)} -> {_fmt(a)}")
    fig = Figure(figsize=(8, 0.5 * len(labels) + 1.5))
    ax = fig.subplots()
    y = range(len(labels))
    ax.barh(list(y), [1.0] * len(labels), color="#cccccc", label="before")
    ax.barh(list(y), ratios, color="#2a7ab9", height=0.5, label="after")
    for i, t in enumerate(texts):
        ax.text(max(ratios[i], 1.0) + 0.02, i, t, va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.0] + ratios) * 1.6)
    ax.set_xlabel("after / before")
    ax.set_title("egp-surgery: graph before and after")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
