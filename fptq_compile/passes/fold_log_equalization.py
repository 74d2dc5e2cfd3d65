"""Fold the plan's logarithmic activation equalization (LAE) scales into the graph.

For every activation group the plan puts on ``lae_static``, with scale ``s`` (one value
per input channel):

Before: ``y = mul(norm_w, x_hat)``;              ``linear(y, W_q)``, ``linear(y, W_k)`` ...
After:  ``y' = mul(norm_w / s, x_hat)`` (= y / s); ``linear(y', W_q * s)``, ``linear(y', W_k * s)``

(for ``aten.layer_norm`` both weight and bias are divided by ``s``). In float the
result is unchanged, up to rounding; only quantization sees the flatter activations.
New tensors are registered for every folded weight: parameters of the captured graph
are shared with the user's model (and tied parameters with each other), so none is
edited in place. Preconditions: the plan's fold nodes are in the graph, as analysis saw
them. Postcondition: every folded linear is tagged ``lae_folded``; running the pass
again changes nothing.
"""

from __future__ import annotations

import torch
from torch import fx

from fptq_compile.errors import PreconditionError
from fptq_compile.graph_utils import add_constant, fetch_tensor, find_node
from fptq_compile.metadata import get_linear_state, update_linear_state
from fptq_compile.passes.base import PassResult
from fptq_compile.plan import ActivationClass, ActivationGroup, FoldKind, QuantPlan


def fold_log_equalization(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Fold each LAE group's scale into its norm and its linears' weight columns."""
    folded_groups = []
    for group in plan.groups:
        if group.activation.kind is not ActivationClass.LAE_STATIC:
            continue
        linears = [_linear_node(graph_module, name, group) for name in group.linears]
        states = {get_linear_state(node).lae_folded for node in linears}
        if states == {True}:
            continue
        if states == {True, False}:
            raise PreconditionError(f"group {group.input_node}: only some of {list(group.linears)} are LAE-folded")
        _fold_group(graph_module, group, linears)
        folded_groups.append(group.input_node)
    return PassResult(graph_module, modified=bool(folded_groups), report={"folded_groups": len(folded_groups)})


def _linear_node(graph_module: fx.GraphModule, name: str, group: ActivationGroup) -> fx.Node:
    node = find_node(graph_module, name)
    if node is None or node.target != torch.ops.aten.linear.default:
        raise PreconditionError(f"LAE group {group.input_node}: linear {name} is not in the graph")
    return node


def _fold_group(graph_module: fx.GraphModule, group: ActivationGroup, linears: list[fx.Node]) -> None:
    assert group.fold is not None and group.lae_scale is not None  # guaranteed by ActivationGroup
    fold = group.fold
    norm = find_node(graph_module, fold.node)
    where = f"LAE group {group.input_node} ({fold.module_path})"
    if norm is None:
        raise PreconditionError(f"{where}: fold node {fold.node} is not in the graph")
    if any(linear.args[0] is not norm for linear in linears) or set(norm.users) != set(linears):
        raise PreconditionError(f"{where}: {fold.node} must feed exactly {list(group.linears)}")
    scale = torch.tensor(group.lae_scale, dtype=torch.float32)

    if fold.kind is FoldKind.RMS_NORM:
        if norm.target != torch.ops.aten.mul.Tensor:
            raise PreconditionError(f"{where}: {fold.node} is {norm.target}, not the RMSNorm weight mul")
        parameters = [(i, arg) for i, arg in enumerate(norm.args) if isinstance(arg, fx.Node) and arg.op == "get_attr"]
        if not parameters:
            raise PreconditionError(f"{where}: {fold.node} multiplies by no parameter")
        position, weight_node = parameters[0]
        new_weight = fetch_tensor(graph_module, str(weight_node.target)) / scale
        _replace_arg(graph_module, norm, position, new_weight, f"fptq_lae_{norm.name}_weight")
    elif fold.kind is FoldKind.LAYER_NORM:
        if norm.target != torch.ops.aten.layer_norm.default:
            raise PreconditionError(f"{where}: {fold.node} is {norm.target}, not aten.layer_norm")
        for position, role in ((2, "weight"), (3, "bias")):
            arg = norm.args[position] if len(norm.args) > position else None
            if isinstance(arg, fx.Node):
                new_value = fetch_tensor(graph_module, str(arg.target)) / scale
                _replace_arg(graph_module, norm, position, new_value, f"fptq_lae_{norm.name}_{role}")

    for linear in linears:
        weight_node = linear.args[1]
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            raise PreconditionError(f"{where}: weight of {linear.name} is not a parameter")
        weight = fetch_tensor(graph_module, str(weight_node.target))
        _replace_arg(graph_module, linear, 1, weight * scale, f"fptq_lae_{linear.name}_weight")
        update_linear_state(linear, lae_folded=True)


def _replace_arg(graph_module: fx.GraphModule, node: fx.Node, position: int, value: torch.Tensor, name: str) -> None:
    """Point ``node.args[position]`` at a new constant holding ``value``."""
    constant = add_constant(graph_module, name, value, before=node)
    node.update_arg(position, constant)
