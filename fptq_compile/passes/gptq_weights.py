"""Choose the int4 codes of the planned weights with GPTQ instead of rounding to nearest.

Before: ``linear(x, W)``
After:  ``linear(x, dequantize_int4_groups(Wq, Ws, Wz, g))`` with ``Ws``/``Wz`` the
round-to-nearest group scales and zero points and ``Wq`` the codes GPTQ chose for them

(see :mod:`fptq_compile.gptq`). GPTQ needs each input's Hessian ``X^T X / n``, which the
calibration observers collect (``insert_observers(..., hessian_dtype=...)``); the
pipeline binds them: ``functools.partial(gptq_weights, stats=..., settings=...)``. The
linears of one activation group read one input, so they share one Hessian and are solved
together. An input that LAE was folded into is ``x / s``: its Hessian is ``H / (s s^T)``.

Runs after ``fold_log_equalization`` (it quantizes the folded weights) and before
``insert_w4a8_qdq``, which then quantizes the activations only. Preconditions: every
linear the plan marks ``gptq`` is in the graph, unquantized, and LAE-folded when its group
is ``lae_static``; the stats hold its Hessian. Postcondition: those linears are tagged
``weight_quantized``; running the pass again changes nothing. The report gives each
weight's SQNR (``weight_sqnr_db``) and its output SQNR on the calibration inputs under
GPTQ and under round to nearest (``output_sqnr_db``, ``rtn_output_sqnr_db``; on a sample
of evenly spaced output rows for weights too big to measure whole).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fptq_compile.config import GPTQConfig
from fptq_compile.errors import CalibrationError, PreconditionError
from fptq_compile.gptq import CHUNK_ELEMENTS, HessianNotPositiveDefinite, gptq_int4_groups, output_error
from fptq_compile.graph_utils import find_node
from fptq_compile.metadata import get_linear_state, update_linear_state
from fptq_compile.passes.base import PassResult
from fptq_compile.passes.insert_observers import ActivationStats
from fptq_compile.passes.insert_w4a8_qdq import float_weight, swap_in_weight_groups
from fptq_compile.plan import ActivationClass, ActivationGroup, LayerPlan, QuantPlan
from fptq_compile.primitives import WeightGroups, dequantize_groups, quantize_int4_groups


def gptq_weights(
    graph_module: fx.GraphModule, plan: QuantPlan, stats: ActivationStats, settings: GPTQConfig | None = None
) -> PassResult:
    """Quantize every weight the plan marks ``gptq`` to int4 groups chosen by GPTQ."""
    settings = settings or GPTQConfig()
    # Check every group before the first edit: a refused plan leaves the graph as it was.
    pending: list[tuple[ActivationGroup, list[tuple[fx.Node, LayerPlan]]]] = []
    for group in plan.groups:
        members = _pending_members(graph_module, plan, group)
        if members:
            _stored_hessian(members, stats)
            pending.append((group, members))

    report: dict[str, dict[str, float]] = {"weight_sqnr_db": {}, "output_sqnr_db": {}, "rtn_output_sqnr_db": {}}
    for group, members in pending:
        # Made per group as it is solved: an LAE group's rescaled Hessian is a copy.
        hessian = _input_hessian(group, members, stats)
        spec = members[0][1].weight
        weights = [float_weight(graph_module, linear, layer).detach().to(torch.float32) for linear, layer in members]
        # One solve for the group: GPTQ treats output rows independently under one Hessian.
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        # GPTQ keeps round to nearest's grid and re-chooses the codes. The grid's clipping is
        # searched on the output error the Hessian's diagonal predicts, not the weight error.
        nearest = quantize_int4_groups(
            stacked, spec.group_size, spec.symmetric, spec.clip_ratios, importance=hessian.diagonal()
        )
        try:
            solved = gptq_int4_groups(
                stacked,
                hessian,
                nearest,
                damp=settings.damp,
                act_order=settings.act_order,
                block_size=settings.block_size,
            )
        except HessianNotPositiveDefinite as error:
            raise CalibrationError(
                f"GPTQ for {', '.join(group.linears)} ({members[0][1].module_path}): {error}; "
                "calibrate on more tokens or raise weights.gptq.damp"
            ) from error
        rows = 0
        for (linear, layer), weight in zip(members, weights, strict=True):
            groups = _rows(solved, rows, rows + weight.shape[0])
            _report(report, layer.node, weight, groups, _rows(nearest, rows, rows + weight.shape[0]), hessian)
            rows += weight.shape[0]
            swap_in_weight_groups(graph_module, linear, groups, bits=4)
            update_linear_state(linear, weight_quantized=True)
        # Not held while the next group is solved (a big model's are hundreds of MB each).
        del hessian, weights, stacked, nearest, solved
    quantized = len(report["weight_sqnr_db"])
    return PassResult(graph_module, modified=bool(pending), report={"gptq_linears": quantized, **report})


def _pending_members(
    graph_module: fx.GraphModule, plan: QuantPlan, group: ActivationGroup
) -> list[tuple[fx.Node, LayerPlan]]:
    """The group's linears planned for GPTQ and not yet quantized, checked against the graph."""
    members = []
    for name in group.linears:
        layer = plan.layer(name)
        if layer is None or not layer.weight.gptq:
            continue
        linear = find_node(graph_module, name)
        if linear is None or linear.target != torch.ops.aten.linear.default:
            raise PreconditionError(f"linear {name} ({layer.module_path}) is not in the graph")
        state = get_linear_state(linear)
        if state.weight_quantized:
            continue
        if group.activation.kind is ActivationClass.LAE_STATIC and not state.lae_folded:
            raise PreconditionError(
                f"{name} ({layer.module_path}) is planned lae_static but not folded yet: "
                "run fold_log_equalization before gptq_weights"
            )
        if layer.weight.bits != 4:
            bits = layer.weight.bits
            raise PreconditionError(f"{name} ({layer.module_path}): GPTQ is for int4 weights, not {bits}-bit")
        float_weight(graph_module, linear, layer)  # refuses a weight that is not a parameter
        members.append((linear, layer))
    specs = {layer.weight for _, layer in members}
    if len(specs) > 1:
        raise PreconditionError(f"group {group.input_node}: its GPTQ linears have different weight specs {specs}")
    return members


def _stored_hessian(members: list[tuple[fx.Node, LayerPlan]], stats: ActivationStats) -> torch.Tensor:
    """The Hessian the calibration observers measured on the group's input."""
    first = members[0][1]
    hessian = stats.per_linear[first.node].hessian if first.node in stats.per_linear else None
    if hessian is None:
        raise PreconditionError(
            f"no Hessian for {first.node} ({first.module_path}): calibrate with insert_observers(hessian_dtype=...)"
        )
    return hessian


def _input_hessian(
    group: ActivationGroup, members: list[tuple[fx.Node, LayerPlan]], stats: ActivationStats
) -> torch.Tensor:
    """The Hessian of the input the group's linears read now (after any LAE fold)."""
    hessian = _stored_hessian(members, stats)
    if get_linear_state(members[0][0]).lae_folded and group.lae_scale is not None:
        scale = torch.tensor(group.lae_scale, dtype=hessian.dtype)
        hessian = hessian.div(scale[:, None]).div_(scale)  # one K x K copy (a 3 B down_proj's is 300 MB)
    return hessian


def _rows(groups: WeightGroups, start: int, stop: int) -> WeightGroups:
    zero_point = None if groups.zero_point is None else groups.zero_point[start:stop].contiguous()
    return WeightGroups(
        groups.codes[start:stop].contiguous(), groups.scale[start:stop].contiguous(), zero_point, groups.group_size
    )


def _report(
    report: dict[str, dict[str, float]],
    node: str,
    weight: torch.Tensor,
    groups: WeightGroups,
    nearest: WeightGroups,
    hessian: torch.Tensor,
) -> None:
    """Weight SQNR (summed a chunk of rows at a time: a big model's stacked gate/up weight is
    ~220 MB in float64), and output SQNR on the calibration inputs beside round to
    nearest's (on every ``step``-th output row of a big weight: the output error costs
    rows x K^2)."""
    out_features, in_features = weight.shape
    signal = noise = 0.0
    chunk = max(1, CHUNK_ELEMENTS // in_features)
    for first in range(0, out_features, chunk):
        rows = slice(first, first + chunk)
        reference = weight[rows].to(torch.float64)
        signal += float(reference.square().sum())
        noise += float((reference - _dequantized(groups, rows)).square().sum())
    report["weight_sqnr_db"][node] = _db(signal, noise)
    sampled = slice(None, None, max(1, math.ceil(out_features * in_features**2 / REPORT_MULTIPLY_ADDS)))
    weight, restored, rounded = weight[sampled], _dequantized(groups, sampled), _dequantized(nearest, sampled)
    signal = float(output_error(weight, torch.zeros_like(weight), hessian).sum())
    report["output_sqnr_db"][node] = _db(signal, float(output_error(weight, restored, hessian).sum()))
    report["rtn_output_sqnr_db"][node] = _db(signal, float(output_error(weight, rounded, hessian).sum()))


def _dequantized(groups: WeightGroups, rows: slice) -> torch.Tensor:
    zero_point = None if groups.zero_point is None else groups.zero_point[rows]
    return dequantize_groups(groups.codes[rows], groups.scale[rows], zero_point, groups.group_size)


# Multiply-adds one output SQNR of the report may cost (SmolLM2's biggest weight, 576 x 1536
# inputs, takes 1.4e9: every row; a 3 B model's down_proj, 3200 x 8640, would take 2.4e11).
REPORT_MULTIPLY_ADDS = 1 << 32


def _db(signal: float, noise: float) -> float:
    return math.inf if noise <= 0 else 10.0 * math.log10(signal / noise)
