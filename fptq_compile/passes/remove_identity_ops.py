"""Remove the ops of a captured graph that return their input unchanged.

``torch.export`` records what the model's Python code does, identities included. SmolLM2
captured with a cache holds 435 of them, and 180 nodes of constants feeding them, in its
3592 nodes:

- full-range slices: ``slice(x, dim, 0, 2**63 - 1)`` (``x[:, :]`` on a dynamic dimension),
  and ``alias(x)`` (the same on a static one);
- casts to the dtype a tensor already has: ``to(x, float32)`` of a float32 ``x`` (the
  norms' upcasts in a float32 model);
- concatenations with an empty 1-D tensor, which ``cat`` skips: ``cat([empty, x])`` (a
  ``DynamicCache`` layer starts from ``torch.tensor([])``), and the lifted empty constant
  with its ``lift_fresh_copy``/``detach_``;
- ``_assert_tensor_metadata`` of an intermediate tensor: a check that it has the dtype and
  device it had when traced, which it has whenever the graph's inputs have theirs (the
  checks of the inputs themselves stay).

Before: ``to(slice(x, 1, 0, 2**63 - 1), float32)`` (x float32)
After:  ``x``

Every later step walks these nodes: re-exporting the compiled graph (for saving and ONNX),
``torch.onnx``'s decomposition, the ONNX optimizer. Removing them at capture makes those
traces shorter and the graph the passes read plainer. Postcondition: the graph computes
the same outputs bit for bit; running the pass again changes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import fx

from fptq_compile.graph_utils import release_if_unused
from fptq_compile.passes.base import PassResult

_ATEN = torch.ops.aten
_FULL_RANGE_END = sys.maxsize
"""The ``end`` torch.export records for an open slice (``x[a:]``): 2**63 - 1."""
_CONSTANT_WRAPPERS = (_ATEN.lift_fresh_copy.default, _ATEN.detach_.default)
"""What wraps a tensor constant created in ``forward``; ``detach_`` is in place, so dead-code
elimination keeps it even when nothing reads it."""


def remove_identity_ops(graph_module: fx.GraphModule) -> PassResult:
    """Replace every identity op by its input and drop the checks and constants left unused."""
    graph = graph_module.graph
    counts = dict.fromkeys([*(kind for kind, _ in _IDENTITIES.values()), "assert"], 0)
    # The checks first: removing an identity may hand an input to the check that read it.
    for node in [node for node in graph.nodes if _checks_an_intermediate(node)]:
        graph.erase_node(node)
        counts["assert"] += 1
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _IDENTITIES:
            continue
        kind, find_source = _IDENTITIES[node.target]
        source = find_source(node)
        # A graph output stays the node it is: an output that is an input would alias it.
        if source is not None and not any(user.op == "output" for user in node.users):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            counts[kind] += 1
    removed = sum(counts.values())
    if removed:
        _erase_unused_constants(graph_module)
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, modified=bool(removed), report=counts)


def _checks_an_intermediate(node: fx.Node) -> bool:
    checked = node.args[0] if node.args else None
    is_check = node.target == _ATEN._assert_tensor_metadata.default
    return is_check and isinstance(checked, fx.Node) and checked.op != "placeholder"


_SLICE_DEFAULTS = (None, 0, None, None, 1)


def _full_slice_source(node: fx.Node) -> fx.Node | None:
    # slice(self, dim=0, start=None, end=None, step=1)
    source, _dim, start, end, step = tuple(node.args) + _SLICE_DEFAULTS[len(node.args) :]
    is_open_end = end is None or (isinstance(end, int) and end >= _FULL_RANGE_END)
    if start in (None, 0) and is_open_end and step == 1 and not node.kwargs and isinstance(source, fx.Node):
        return source
    return None


def _alias_source(node: fx.Node) -> fx.Node | None:
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _same_dtype_cast_source(node: fx.Node) -> fx.Node | None:
    # to.dtype(self, dtype, non_blocking=False, copy=False, memory_format=None)
    source, dtype = node.args[0], node.args[1]
    copies = any(node.kwargs.get(key) for key in ("copy", "memory_format")) or len(node.args) > 3
    if isinstance(source, fx.Node) and not copies and _dtype(source) == dtype:
        return source
    return None


def _cat_with_empty_source(node: fx.Node) -> fx.Node | None:
    operands = node.args[0]
    if not isinstance(operands, (list, tuple)) or len(operands) != 2:
        return None
    tensors = [tensor for tensor in operands if isinstance(tensor, fx.Node)]
    if len(tensors) != 2:
        return None
    kept = [tensor for tensor in tensors if not _is_empty_vector(tensor)]
    # cat promotes over every input, skipped ones too: the result must keep the kept one's dtype.
    if len(kept) == 1 and _dtype(kept[0]) is not None and _dtype(kept[0]) == _dtype(node):
        return kept[0]
    return None


def _is_empty_vector(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == 0


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


_IDENTITIES: dict[object, tuple[str, Callable[[fx.Node], fx.Node | None]]] = {
    _ATEN.slice.Tensor: ("slice", _full_slice_source),
    _ATEN.alias.default: ("alias", _alias_source),
    _ATEN.to.dtype: ("to", _same_dtype_cast_source),
    _ATEN.cat.default: ("cat", _cat_with_empty_source),
}
"""Per op that may be an identity: its name in the report, and the input it returns
unchanged (None where this call is not an identity)."""


def _erase_unused_constants(graph_module: fx.GraphModule) -> None:
    """Erase the constant wrappers nothing reads (last first, so a chain goes whole) and the
    tensors they wrapped."""
    for node in reversed(list(graph_module.graph.nodes)):
        if node.op == "call_function" and node.target in _CONSTANT_WRAPPERS and not node.users:
            wrapped = node.args[0]
            graph_module.graph.erase_node(node)
            release_if_unused(graph_module, wrapped)
