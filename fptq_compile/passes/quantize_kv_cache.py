"""Quantize what enters the key/value cache to int8, per token and head, when the plan asks.

Before: ``present = cat([past, new], dim=-2)``
After:  ``q, s = quantize_per_token(new)``; ``present = cat([past, dequantize_per_token(q, s)], dim=-2)``

The cache outputs of the captured graph (every output after the logits) are found from
the graph: each is a concatenation, along the sequence axis, of the cache so far and the
new keys (after the rotary embedding) or values. The new entries get a symmetric int8
scale per token and head (``absmax / 127.5`` over ``head_dim``): attention then reads,
for the new tokens and for every later step, values an int8 cache with those scales
holds exactly, so the torch graph has an int8 KV cache's accuracy. The tensors stay float
in the graph's interface (the runtime's cache storage is unchanged). Preconditions: the
graph is a captured ``(input_ids, past) -> (logits, present)`` graph. Postcondition:
every present key and value is fed by ``dequantize_per_token``; running the pass again
changes nothing; a plan without ``kv_cache_int8`` leaves the graph as it is.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import fptq_compile.ops  # noqa: F401  (registers torch.ops.fptq)
from fptq_compile.errors import UnsupportedGraphError
from fptq_compile.passes.base import PassResult
from fptq_compile.plan import QuantPlan

fptq_ops = torch.ops.fptq


def quantize_kv_cache(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Put an int8 per-token Q/DQ on the new entries of every cache output."""
    if not plan.kv_cache_int8:
        return PassResult(graph_module, modified=False, report={"quantized_cache_tensors": 0})
    # Check every cache output before the first edit.
    pending = [entry for entry in map(_new_entries, _cache_outputs(graph_module)) if not _is_quantized(entry)]
    graph = graph_module.graph
    for concatenation, new in pending:
        with graph.inserting_before(concatenation):
            quantized = graph.call_function(fptq_ops.quantize_per_token.default, (new,))
            codes = graph.call_function(operator.getitem, (quantized, 0))
            scale = graph.call_function(operator.getitem, (quantized, 1))
            dequantized = graph.call_function(fptq_ops.dequantize_per_token.default, (codes, scale))
        concatenation.replace_input_with(new, dequantized)
    return PassResult(graph_module, modified=bool(pending), report={"quantized_cache_tensors": len(pending)})


def _cache_outputs(graph_module: fx.GraphModule) -> list[fx.Node]:
    (outputs,) = graph_module.graph.find_nodes(op="output")[0].args
    cache = list(outputs[1:]) if isinstance(outputs, (list, tuple)) else []
    if not cache or len(cache) % 2 or not all(isinstance(node, fx.Node) for node in cache):
        raise UnsupportedGraphError("the graph has no (key, value) cache outputs after the logits")
    return cache


def _new_entries(present: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The concatenation producing ``present`` and its new (last) input."""
    is_sequence_cat = present.target == torch.ops.aten.cat.default and present.args[1:] in ((-2,), (2,))
    parts = present.args[0] if is_sequence_cat else None
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(parts[1], fx.Node):
        raise UnsupportedGraphError(
            f"cache output {present.name} is {present.target}, not cat([past, new], dim=-2): "
            "cannot find the entries it adds"
        )
    return present, parts[1]


def _is_quantized(entry: tuple[fx.Node, fx.Node]) -> bool:
    return entry[1].target == fptq_ops.dequantize_per_token.default
