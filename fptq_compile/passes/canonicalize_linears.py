"""Rewrite matmuls with a parameter weight as ``aten.linear``, the one form the passes quantize.

Before: ``addmm(b, x, W)`` / ``mm(x, W)`` / ``matmul(x, W)``, ``W`` a 2-D parameter ``[in, out]``
(GPT-2's ``Conv1D`` stores its weight so).
After:  ``linear(x, W_t, b)`` / ``linear(x, W_t)``, ``W_t = Wᵀ`` a new ``[out, in]`` constant.

The user's parameter is never transposed in place: ``W_t`` is registered on the graph
module (one per parameter, shared by every matmul reading it), and the node keeps the
original's metadata (its module path). ``addmm`` with ``beta``/``alpha`` other than 1 and
matmuls whose parameter is the left operand are left as they are; :func:`unsupported_matmuls`
lists them, so the plan names them as kept float. Postcondition: running the pass again
changes nothing.
"""

from __future__ import annotations

import torch
from torch import fx

from fptq_compile.graph_utils import add_constant, fetch_tensor
from fptq_compile.passes.base import PassResult

_ATEN = torch.ops.aten
_MATMULS = (_ATEN.addmm.default, _ATEN.mm.default, _ATEN.matmul.default)
"""Matmuls the pass rewrites when their right operand is a 2-D parameter."""
_PARAMETER_MATMULS = (*_MATMULS, _ATEN.linear.default, _ATEN.bmm.default, _ATEN.baddbmm.default)


def canonicalize_linears(graph_module: fx.GraphModule) -> PassResult:
    """Turn every matmul of an activation by a 2-D parameter into ``aten.linear``."""
    transposed: dict[str, fx.Node] = {}
    rewritten = 0
    # Shared constants go first, before every possible reader.
    first = next(node for node in graph_module.graph.nodes if node.op != "placeholder")
    for node in list(graph_module.graph.nodes):
        operands = _activation_and_weight(node)
        if operands is None:
            continue
        activation, weight, bias = operands
        target = str(weight.target)
        if target not in transposed:
            name = "fptq_t_" + target.replace(".", "_")
            transposed[target] = add_constant(graph_module, name, fetch_tensor(graph_module, target).t(), before=first)
        with graph_module.graph.inserting_before(node):
            linear = graph_module.graph.call_function(_ATEN.linear.default, (activation, transposed[target], bias))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        graph_module.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph_module.graph.eliminate_dead_code()
        graph_module.graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, modified=bool(rewritten), report={"rewritten": rewritten})


def _activation_and_weight(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(x, W, bias)`` of a rewritable matmul ``x @ W (+ bias)``, ``W`` a 2-D parameter; else None."""
    if node.op != "call_function" or node.target not in _MATMULS or node.kwargs:
        return None
    bias = None
    args = node.args
    if node.target == _ATEN.addmm.default:
        if len(args) != 3 or not isinstance(args[0], fx.Node) or _rank(args[0]) != 1:
            return None  # beta/alpha given, or a bias broadcast other than per output
        bias, args = args[0], args[1:]
    activation, weight = args[0], args[1]
    if not (isinstance(activation, fx.Node) and isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if _rank(weight) != 2 or activation.op == "get_attr":
        return None
    return activation, weight, bias


def _is_parameter(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _rank(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return value.dim()
    if node.op == "get_attr":
        module = node.graph.owning_module
        assert module is not None
        return fetch_tensor(module, str(node.target)).dim()
    return None


def unsupported_matmuls(graph_module: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Matmuls reading a parameter that are not ``aten.linear`` with it as weight, and why
    (what :func:`canonicalize_linears` could not rewrite)."""
    found = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _PARAMETER_MATMULS:
            continue
        # The two matmul operands (addmm and baddbmm take the bias first).
        with_bias_first = node.target in (_ATEN.addmm.default, _ATEN.baddbmm.default)
        operands = node.args[1:3] if with_bias_first else node.args[0:2]
        if not any(isinstance(arg, fx.Node) and arg.op == "get_attr" for arg in operands):
            continue
        if node.target == _ATEN.linear.default and _is_parameter(node.args[1]) and not _is_parameter(node.args[0]):
            continue
        found.append((node, f"{node.target} reading a parameter in a form not rewritten as a linear (kept float)"))
    return found
