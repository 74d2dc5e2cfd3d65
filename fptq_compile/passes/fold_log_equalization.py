"""Fold the plan's logarithmic activation equalization (LAE) scales into the graph.

For every activation group the plan puts on ``lae_static``, with scale ``s`` (one value
per input channel):

Before: ``y = mul(norm_w, x_hat)``;              ``linear(y, W_q)``, ``linear(y, W_k)`` ...
After:  ``y' = mul(norm_w / s, x_hat)`` (= y / s); ``linear(y', W_q * s)``, ``linear(y', W_k * s)``

(for an offset gain ``mul(c + w, x_hat)``, Gemma's ``1 + w``, ``w`` becomes ``(c + w) / s - c``;
for ``aten.layer_norm`` both weight and bias are divided by ``s``; for a gated MLP's
``mul(act(gate(x)), up(x))`` feeding down_proj, the rows of ``up``'s weight and bias are:
``up'(x) = up(x) / s``; for an attention output feeding o_proj, the rows of the value
projection ``v``, one scale per value channel shared by the query heads reading it). In
float the result is unchanged, up to rounding; only quantization sees the flatter activations.
New tensors are registered for every folded weight: parameters of the captured graph
are shared with the user's model (and tied parameters with each other), so none is
edited in place. Preconditions: the plan's fold nodes are in the graph, as analysis saw
them (casts and channel-keeping views may lie between a norm and its linears).
Postcondition: every folded linear is tagged ``lae_folded``; running the pass
again changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fptq_compile.errors import PreconditionError
from fptq_compile.graph_utils import (
    add_constant,
    channel_gain,
    fetch_tensor,
    find_node,
    release_if_unused,
    transparent_source,
)
from fptq_compile.metadata import get_linear_state, update_linear_state
from fptq_compile.passes.base import PassResult
from fptq_compile.plan import ActivationClass, ActivationGroup, FoldKind, QuantPlan


def fold_log_equalization(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Fold each LAE group's scale into its norm and its linears' weight columns."""
    # Check every group before the first edit: a refused plan leaves the graph as it was.
    pending: list[_Fold] = []
    for group in plan.groups:
        if group.activation.kind is not ActivationClass.LAE_STATIC:
            continue
        linears = [_linear_node(graph_module, name, group) for name in group.linears]
        states = {get_linear_state(node).lae_folded for node in linears}
        if states == {True}:
            continue
        if states == {True, False}:
            raise PreconditionError(f"group {group.input_node}: only some of {list(group.linears)} are LAE-folded")
        pending.append(_check_fold(graph_module, group, linears))
    for fold in pending:
        _apply_fold(graph_module, fold)
    return PassResult(graph_module, modified=bool(pending), report={"folded_groups": len(pending)})


@dataclass(frozen=True)
class _Fold:
    """One group's fold, checked against the graph: what to divide and what to multiply."""

    scale: torch.Tensor
    norm: fx.Node
    """The node that takes the scale: a norm, or the ``up`` / ``v`` linear (rows)."""
    parameter_reads: tuple[tuple[fx.Node, int], ...]
    """The parameters divided by the scale, each as (the node reading it, its argument position)."""
    linears: tuple[fx.Node, ...]
    row_scale: torch.Tensor | None = None
    """For folds into a linear's rows (``up``, ``v``): the scale per row (per value channel for ``v``)."""
    gain_offset: float = 0.0
    """For an offset RMSNorm gain ``c + w``: ``c`` (``w`` becomes ``(c + w) / s - c``)."""


def _linear_node(graph_module: fx.GraphModule, name: str, group: ActivationGroup) -> fx.Node:
    node = find_node(graph_module, name)
    if node is None or node.target != torch.ops.aten.linear.default:
        raise PreconditionError(f"LAE group {group.input_node}: linear {name} is not in the graph")
    return node


def _is_parameter(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _check_fold(graph_module: fx.GraphModule, group: ActivationGroup, linears: list[fx.Node]) -> _Fold:
    fold, lae_scale = group.fold, group.lae_scale
    if fold is None or lae_scale is None:
        raise PreconditionError(f"LAE group {group.input_node} has no fold target or scale")
    where = f"LAE group {group.input_node} ({fold.module_path})"
    norm = find_node(graph_module, fold.node)
    if norm is None:
        raise PreconditionError(f"{where}: fold node {fold.node} is not in the graph")
    rows = fold.kind in (FoldKind.LINEAR_ROWS, FoldKind.ATTENTION_VALUE)
    produced = find_node(graph_module, group.input_node)
    if produced is None or (fold.kind is FoldKind.LINEAR_ROWS and set(norm.users) != {produced}):
        raise PreconditionError(f"{where}: {fold.node} must feed only the gated product {group.input_node}")
    if not rows and transparent_source(produced) is not norm:
        raise PreconditionError(f"{where}: {group.input_node} is not {fold.node}'s output (through casts and views)")
    if fold.kind is FoldKind.ATTENTION_VALUE and len(norm.users) != 1:
        raise PreconditionError(f"{where}: the value projection {fold.node} must feed only its attention")
    if any(linear.args[0] is not produced for linear in linears) or set(produced.users) != set(linears):
        raise PreconditionError(f"{where}: {produced.name} must feed exactly {list(group.linears)}")
    if any(not _is_parameter(linear.args[1]) for linear in linears):
        raise PreconditionError(f"{where}: a weight of {list(group.linears)} is not a parameter")
    if rows:
        if norm.target != torch.ops.aten.linear.default:
            raise PreconditionError(f"{where}: {fold.node} is {norm.target}, not a linear")
        reads = [(norm, i) for i in (1, 2) if len(norm.args) > i and _is_parameter(norm.args[i])]
    elif fold.kind is FoldKind.RMS_NORM:
        is_mul = norm.target == torch.ops.aten.mul.Tensor
        gain = next((g for a in norm.args if is_mul and (g := channel_gain(graph_module, a, norm)) is not None), None)
        if gain is None or gain.offset != fold.gain_offset:
            raise PreconditionError(f"{where}: {fold.node} is not a norm's gain mul with offset {fold.gain_offset:g}")
        reads = [(gain.reader, gain.reader.args.index(gain.parameter))]
    else:
        if norm.target != torch.ops.aten.layer_norm.default:
            raise PreconditionError(f"{where}: {fold.node} is {norm.target}, not aten.layer_norm")
        reads = [(norm, i) for i in (2, 3) if len(norm.args) > i and _is_parameter(norm.args[i])]
    if not reads:
        raise PreconditionError(f"{where}: {fold.node} has no parameter to fold into")
    scale = torch.tensor(lae_scale, dtype=torch.float32)
    row_scale = scale
    if fold.kind is FoldKind.ATTENTION_VALUE:
        # One scale per value channel; the query heads sharing it carry equal copies.
        kv_channel = fold.kv_channel_of(scale.numel())
        row_scale = torch.zeros(int(kv_channel.max()) + 1).scatter_(0, kv_channel, scale)
        if not torch.equal(row_scale[kv_channel], scale):
            raise PreconditionError(f"{where}: the scale differs between query heads that read one value head")
    return _Fold(scale, norm, tuple(reads), tuple(linears), row_scale if rows else None, fold.gain_offset)


def _apply_fold(graph_module: fx.GraphModule, fold: _Fold) -> None:
    for reader, position in fold.parameter_reads:
        parameter = reader.args[position]
        assert isinstance(parameter, fx.Node)  # checked by _check_fold
        value = fetch_tensor(graph_module, str(parameter.target))
        # A weight's rows (dim 0) take the scale; 1-D norm weights and biases are per channel.
        if fold.row_scale is not None:
            new_value = value / (fold.row_scale[:, None] if value.dim() == 2 else fold.row_scale)
        elif fold.gain_offset:
            offset = fold.gain_offset  # (c + w') = (c + w) / s, computed in float64
            new_value = ((value.double() + offset) / fold.scale.double() - offset).to(value.dtype)
        else:
            new_value = value / fold.scale
        name = f"fptq_lae{'_rows' if fold.row_scale is not None else ''}_{reader.name}_arg{position}"
        _replace_arg(graph_module, reader, position, new_value, name)
    for linear in fold.linears:
        weight = linear.args[1]
        assert isinstance(weight, fx.Node)  # checked by _check_fold
        new_weight = fetch_tensor(graph_module, str(weight.target)) * fold.scale
        _replace_arg(graph_module, linear, 1, new_weight, f"fptq_lae_{linear.name}_weight")
        update_linear_state(linear, lae_folded=True)


def _replace_arg(graph_module: fx.GraphModule, node: fx.Node, position: int, value: torch.Tensor, name: str) -> None:
    """Point ``node.args[position]`` at a new constant holding ``value`` (the old one is
    dropped if nothing else reads it)."""
    old = node.args[position]
    node.update_arg(position, add_constant(graph_module, name, value, before=node))
    release_if_unused(graph_module, old)
