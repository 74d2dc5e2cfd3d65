"""Quantize the planned linears: int4 group-wise weights and int8 activations.

Before: ``linear(x, W, b)``
After:  ``linear(x_dq, dequantize_int4_groups(Wq, Ws, Wz, g), b)`` where ``x_dq`` is

- static:  ``dequantize_per_tensor(quantize_per_tensor(x, s), s)``;
- dynamic: ``q, s = quantize_per_token(x)``; ``dequantize_per_token(q, s)``;
- float (weight-only): ``x`` itself.

Linears the plan gives 8-bit weights (weight-only layers such as ``lm_head``) read
``dequantize_int8_groups(Wq, Ws, g)`` instead: symmetric int8 groups, float activations.

``Wq`` holds real int4 values (in an int8 tensor, one per byte) with per-group scales
``Ws`` (and int4 zero points ``Wz`` when asymmetric), registered as buffers that
exporters emit as they are. The ops are ``torch.ops.fptq.*`` (see :mod:`fptq_compile.ops`).
Linears of one activation group share one activation Q/DQ chain. Bias stays float.
Preconditions: groups the plan puts on ``lae_static`` were folded by
``fold_log_equalization`` (their static scale assumes it). Postcondition: every planned
linear is tagged ``quantized``; running the pass again changes nothing. The report gives
each weight's SQNR against its float values (``weight_sqnr_db``, by node). Weights an
earlier pass already quantized (``gptq_weights``, tagged ``weight_quantized``) are kept:
only their activation is quantized here; a weight planned for GPTQ but not yet
quantized is refused.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import fptq_compile.ops  # noqa: F401  (registers torch.ops.fptq)
from fptq_compile.errors import PreconditionError
from fptq_compile.graph_utils import add_constant, fetch_tensor, find_node, release_if_unused
from fptq_compile.metadata import get_linear_state, update_linear_state
from fptq_compile.passes.base import PassResult
from fptq_compile.plan import ActivationClass, ActivationGroup, LayerPlan, QuantPlan
from fptq_compile.primitives import (
    WeightGroups,
    dequantize_groups,
    quantize_int4_groups,
    quantize_int8_groups,
    sqnr_db,
)

fptq_ops = torch.ops.fptq


def insert_w4a8_qdq(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Replace every planned linear's weight by int4 data and quantize its input."""
    # Check every precondition before the first edit: a refused plan leaves the graph as it was.
    pending: list[tuple[fx.Node, LayerPlan, ActivationGroup]] = []
    for layer in plan.layers:
        linear = find_node(graph_module, layer.node)
        if linear is None or linear.target != torch.ops.aten.linear.default:
            raise PreconditionError(f"linear {layer.node} ({layer.module_path}) is not in the graph")
        state = get_linear_state(linear)
        if state.quantized:
            continue
        group = plan.group_of(layer)
        if layer.weight.gptq and not state.weight_quantized:
            raise PreconditionError(
                f"{layer.node} ({layer.module_path}) is planned for GPTQ weights but they were not quantized: "
                "run gptq_weights first (compile adds it when weights.rounding is gptq)"
            )
        if group.activation.kind is ActivationClass.LAE_STATIC and not state.lae_folded:
            raise PreconditionError(
                f"{layer.node} ({layer.module_path}) is planned lae_static but its LAE scale was not folded: "
                "run fold_log_equalization first, or plan without LAE"
            )
        if not isinstance(linear.args[0], fx.Node):
            raise PreconditionError(f"{layer.node} ({layer.module_path}): input is not a graph value")
        pending.append((linear, layer, group))

    quantized_inputs: dict[str, fx.Node] = {}
    weight_sqnr_db: dict[str, float] = {}
    for linear, layer, group in pending:
        if not get_linear_state(linear).weight_quantized:
            weight_sqnr_db[layer.node] = _quantize_weight(graph_module, linear, layer)
        activation = linear.args[0]
        assert isinstance(activation, fx.Node)  # checked above
        if group.activation.kind is not ActivationClass.FLOAT:
            if group.input_node not in quantized_inputs:
                quantized_inputs[group.input_node] = _quantize_activation(graph_module, activation, group)
            linear.replace_input_with(activation, quantized_inputs[group.input_node])
        update_linear_state(linear, quantized=True, weight_quantized=True)
    return PassResult(
        graph_module,
        modified=bool(pending),
        report={"quantized_linears": len(pending), "weight_sqnr_db": weight_sqnr_db},
    )


def _quantize_weight(graph_module: fx.GraphModule, linear: fx.Node, layer: LayerPlan) -> float:
    """Swap the weight for its int4 (or int8) groups; return their SQNR in dB against the float weight."""
    weight = float_weight(graph_module, linear, layer)
    spec = layer.weight
    if spec.bits == 8:
        groups = quantize_int8_groups(weight, spec.group_size)
    elif spec.bits == 4:
        groups = quantize_int4_groups(weight, spec.group_size, spec.symmetric, spec.clip_ratios)
    else:
        raise PreconditionError(f"{layer.node} ({layer.module_path}): {spec.bits}-bit weights are not supported")
    swap_in_weight_groups(graph_module, linear, groups, spec.bits)
    return sqnr_db(weight, dequantize_groups(groups.codes, groups.scale, groups.zero_point, groups.group_size))


def float_weight(graph_module: fx.GraphModule, linear: fx.Node, layer: LayerPlan) -> torch.Tensor:
    """The planned linear's weight parameter (refused if the weight is not a parameter)."""
    weight_node = linear.args[1]
    if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        raise PreconditionError(f"{layer.node} ({layer.module_path}): weight is not a parameter")
    return fetch_tensor(graph_module, str(weight_node.target))


def swap_in_weight_groups(graph_module: fx.GraphModule, linear: fx.Node, groups: WeightGroups, bits: int) -> None:
    """Make ``linear`` read its weight from ``groups`` (codes, scales, zero points as buffers)
    through ``dequantize_int4_groups`` (or ``dequantize_int8_groups``), the form exporters lower."""
    prefix = f"fptq_{linear.name}_weight"
    codes = add_constant(graph_module, f"{prefix}_int{bits}", groups.codes, before=linear)
    scale = add_constant(graph_module, f"{prefix}_scale", groups.scale, before=linear)
    with graph_module.graph.inserting_before(linear):
        if bits == 8:
            dequantized = graph_module.graph.call_function(
                fptq_ops.dequantize_int8_groups.default, (codes, scale, groups.group_size)
            )
        else:
            zero_point = None
            if groups.zero_point is not None:
                zero_point = add_constant(graph_module, f"{prefix}_zero_point", groups.zero_point, before=linear)
            dequantized = graph_module.graph.call_function(
                fptq_ops.dequantize_int4_groups.default, (codes, scale, zero_point, groups.group_size)
            )
    float_weight = linear.args[1]
    linear.update_arg(1, dequantized)
    release_if_unused(graph_module, float_weight)


def _quantize_activation(graph_module: fx.GraphModule, activation: fx.Node, group: ActivationGroup) -> fx.Node:
    """Insert the group's Q/DQ chain right after its input and return the DQ node."""
    graph = graph_module.graph
    if group.activation.kind is ActivationClass.DYNAMIC:
        with graph.inserting_after(activation):
            quantized = graph.call_function(fptq_ops.quantize_per_token.default, (activation,))
        with graph.inserting_after(quantized):
            codes = graph.call_function(operator.getitem, (quantized, 0))
        with graph.inserting_after(codes):
            scale = graph.call_function(operator.getitem, (quantized, 1))
        with graph.inserting_after(scale):
            return graph.call_function(fptq_ops.dequantize_per_token.default, (codes, scale))
    static_scale = group.activation.scale
    if static_scale is None:
        raise PreconditionError(f"group {group.input_node}: static activation without a scale")
    with graph.inserting_after(activation):
        codes = graph.call_function(fptq_ops.quantize_per_tensor.default, (activation, static_scale))
    with graph.inserting_after(codes):
        return graph.call_function(fptq_ops.dequantize_per_tensor.default, (codes, static_scale))
