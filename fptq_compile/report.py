"""The quantization report: what happened to every layer, and what it cost.

:func:`build_report` gathers plain data from a compiled model (its plan, its compile
report, optional perplexity and export figures); :func:`write_report` writes it as
``report.json``, a self-contained ``report.html`` and ``report.png``, the main plot:
per linear in execution order, the activation max|X| on a log scale with the thresholds
v0 and v1 drawn and the class chosen, and below it the weight and activation SQNR.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from fptq_compile.pipeline import CompiledModel
from fptq_compile.plan import ActivationClass

REPORT_JSON, REPORT_HTML, REPORT_PNG = "report.json", "report.html", "report.png"
_CLASS_COLORS = {
    ActivationClass.STATIC.value: "#2b8cbe",
    ActivationClass.LAE_STATIC.value: "#31a354",
    ActivationClass.DYNAMIC.value: "#e6550d",
    ActivationClass.FLOAT.value: "#756bb1",
}
_BLOCK = re.compile(r"\.(\d+)\.")


def build_report(
    compiled: CompiledModel, *, model: str | None = None, perplexity: float | None = None, **extra: Any
) -> dict[str, Any]:
    """The report as JSON-ready data: a summary, one row per linear, the skipped layers."""
    plan, compile_report = compiled.plan, compiled.report
    # Whichever pass quantized a weight (insert_w4a8_qdq, gptq_weights) reports its SQNR.
    weight_sqnr = {
        node: value
        for report in compile_report.pass_reports.values()
        for node, value in report.get("weight_sqnr_db", {}).items()
    }
    rows = []
    for index, layer in enumerate(plan.layers):
        group = plan.group_of(layer)
        measured = group.candidate_sqnr_db or {}
        block = _BLOCK.search(f".{layer.module_path}.")
        rows.append(
            {
                "index": index,
                "module_path": layer.module_path,
                "node": layer.node,
                "block": int(block.group(1)) if block else None,
                "activation_absmax": group.activation_absmax,
                "activation_class": group.activation.kind.value,
                "reason": group.reason,
                "lae_scale_range": None if group.lae_scale is None else [min(group.lae_scale), max(group.lae_scale)],
                "weight_sqnr_db": weight_sqnr.get(layer.node),
                "activation_sqnr_db": measured.get(group.candidate) if group.candidate else None,
                "activation_candidate": group.candidate,
                "activation_sqnr_db_if_static": measured.get("static"),
                "activation_sqnr_db_if_dynamic": measured.get("dynamic"),
            }
        )
    weight_bytes = compile_report.linear_weight_bytes
    summary = {
        "model": model,
        "policy": plan.policy,
        "thresholds": [plan.static_threshold, plan.dynamic_threshold],
        "weights": vars(plan.layers[0].weight) if plan.layers else None,
        "linears_per_activation_class": plan.activation_class_counts(),
        "skipped_linears": len(plan.skipped),
        "linear_weight_bytes": weight_bytes,
        "linear_weight_ratio": (
            weight_bytes["compiled"] / weight_bytes["float32"] if weight_bytes.get("float32") else None
        ),
        "seconds_per_step": compile_report.seconds_per_step,
        "capture_route": compile_report.capture_route,
        "calibration_tokens": compile_report.calibration_tokens,
        "peak_rss_bytes": compile_report.peak_rss_bytes,
        "perplexity": perplexity,
        **extra,
    }
    skipped = [vars(layer).copy() for layer in plan.skipped]
    return {"summary": _finite(summary), "layers": _finite(rows), "skipped": skipped}


def write_report(report: dict[str, Any], folder: str | Path) -> None:
    """Write ``report.json``, ``report.png`` and ``report.html`` (with the plot inside) into ``folder``."""
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=1), encoding="utf-8")
    png = plot_png(report)
    (folder / REPORT_PNG).write_bytes(png)
    (folder / REPORT_HTML).write_text(render_html(report, png), encoding="utf-8")


def plot_png(report: dict[str, Any]) -> bytes:
    """The main plot as PNG bytes (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.lines import Line2D

    rows = report["layers"]
    v0, v1 = report["summary"]["thresholds"]
    figure, (ranges, errors) = pyplot.subplots(2, 1, figsize=(12, 6.5), sharex=True, height_ratios=(3, 2))
    positions = [row["index"] for row in rows]
    ranges.scatter(
        positions,
        [max(row["activation_absmax"], 1e-6) for row in rows],
        c=[_CLASS_COLORS[row["activation_class"]] for row in rows],
        s=14,
    )
    ranges.set_yscale("log")
    ranges.axhline(v0, color="gray", linestyle="--", linewidth=1)
    ranges.axhline(v1, color="black", linestyle="--", linewidth=1)
    ranges.set_ylabel("activation max|X| (log)")
    legend = [
        Line2D([], [], marker="o", linestyle="", color=color, label=kind) for kind, color in _CLASS_COLORS.items()
    ]
    legend += [
        Line2D([], [], color="gray", linestyle="--", label=f"v0 = {v0:g}"),
        Line2D([], [], color="black", linestyle="--", label=f"v1 = {v1:g}"),
    ]
    ranges.legend(handles=legend, fontsize=8, ncol=6, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    model = Path(str(report["summary"].get("model") or "model")).name
    figure.suptitle(f"{model}: activation range and class per linear")
    for key, label, color in (
        ("weight_sqnr_db", "weight SQNR", "#636363"),
        ("activation_sqnr_db", "activation int8 SQNR", "#e6550d"),
    ):
        points = [(row["index"], row[key]) for row in rows if row[key] is not None]
        if points:
            errors.plot(*zip(*points, strict=True), marker=".", linewidth=0.8, label=label, color=color)
    errors.set_ylabel("SQNR (dB)")
    errors.set_xlabel("linear, in execution order (ticks: first linear of each block)")
    errors.legend(fontsize=8, ncol=2, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    firsts: dict[int, int] = {}
    for row in rows:
        if row["block"] is not None:
            firsts.setdefault(row["block"], row["index"])
    step = max(1, len(firsts) // 15)
    errors.set_xticks([index for block, index in firsts.items() if block % step == 0])
    errors.set_xticklabels([str(block) for block in firsts if block % step == 0])
    for axis in (ranges, errors):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def render_html(report: dict[str, Any], png: bytes) -> str:
    """A single HTML page: the summary, the plot (embedded), the per-layer table, the skipped layers."""
    summary = report["summary"]
    image = base64.b64encode(png).decode("ascii")
    summary_rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(_format(value))}</td></tr>" for key, value in summary.items()
    )
    columns = (
        "index",
        "module_path",
        "activation_absmax",
        "activation_class",
        "lae_scale_range",
        "weight_sqnr_db",
        "activation_sqnr_db",
        "activation_sqnr_db_if_static",
        "activation_sqnr_db_if_dynamic",
        "reason",
    )
    header = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join(
        f'<tr style="border-left:4px solid {_CLASS_COLORS[row["activation_class"]]}">'
        + "".join(f"<td>{html.escape(_format(row[column]))}</td>" for column in columns)
        + "</tr>"
        for row in report["layers"]
    )
    skipped = "".join(
        f"<li><code>{html.escape(layer['module_path'] or layer['node'])}</code>: {html.escape(layer['reason'])}</li>"
        for layer in report["skipped"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fptq_compile report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>W4A8 quantization report</h1>
<table>{summary_rows}</table>
<h2>Activation range, class and error per linear</h2>
<img alt="activation max|X| and SQNR per linear" src="data:image/png;base64,{image}">
<h2>Layers</h2>
<table><tr>{header}</tr>{body}</table>
<h2>Kept float</h2>
<ul>{skipped or "<li>none</li>"}</ul>
</body></html>
"""


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(item) for item in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_format(item)}" for key, item in value.items())
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no infinity: the SQNR of an exact (error-free) quantization is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
