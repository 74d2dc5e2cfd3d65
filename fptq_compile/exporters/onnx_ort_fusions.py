"""ONNX Runtime's fused transformer ops for the ``ort`` layout.

:func:`fuse_for_onnx_runtime` runs onnxscript's ``optimize_for_ort`` fusions on the
exported decoder and repairs two things they leave behind:

- rotary embedding + KV concat + grouped-head expand + attention become one
  ``com.microsoft.GroupQueryAttention`` per layer (q/k/v fed packed when they come from one
  merged MatMul, see :func:`~fptq_compile.exporters.onnx_rewrites.merge_parallel_matmuls`);
- residual add + RMSNorm become ``com.microsoft.SkipSimplifiedLayerNormalization``.

Then, when every layer's attention fused (so only ``GroupQueryAttention`` reads the cache),
the model gets an ``attention_mask`` input ``[batch, total_length]`` (int64, ones): GQA's
``seqlens_k`` becomes its row sums minus one and ``total_sequence_length`` its length, the
convention of onnxruntime-genai's own GQA models. Nothing reads the cache's length any
more, so a runtime may pass a cache buffer longer than its contents and bind it as the
present output too: ORT then appends each step's keys and values in place instead of
copying the whole cache (:class:`fptq_compile.runtime.OrtCausalLM` does). Without the mask
(some attention unfused), GQA's ``seqlens_k``, which the fusion derives from the position
ids of one row, is expanded to one entry per batch row.

Repair: an RMSNorm with no residual in front of it is left as an ONNX-domain
``SimplifiedLayerNormalization``, which ORT runs but ``onnx.checker`` does not know, so it
is written back in standard ops. Last, each static activation's scale is folded into the
norm weight in front of it and the int4 weight scales behind it
(:func:`~fptq_compile.exporters.onnx_rewrites.fold_static_scales`; its codes are dequantized
by a ``Cast``), and the linears still fuse into ``MatMulNBits`` when the session starts. And
int8 weight-only codes that are a float table of the file quantized (a tied ``lm_head``)
are computed from it when the session starts instead of stored
(:func:`~fptq_compile.exporters.onnx_rewrites.int8_weights_from_float_tables`).

The fusion runs without one of onnxscript's default rewrite rules,
``slice_split_rule`` (two ``Slice`` -> ``Split``): onnxscript 0.7 matches a rule with two
output nodes by indexing the whole graph for every node it tries, so that one rule costs
time quadratic in the node count. On SmolLM2 (3900 nodes when it first runs) it took 22 of
the fusion's 27 s, and dropping it leaves the fused graph the same (1086 nodes, the same
op counts): the exported rotary halves are ``Slice`` with steps, which it does not match.

Before fusing, onnxscript's ``fuse_xformers`` runs ONNX shape inference, its optimizer,
its shape rules and the optimizer again. The fusion here runs the optimizer and the shape
rules once each (:func:`_lean_pre_optimization`): the lowered graph carries torch.onnx's
shapes on every value, and the second optimizer pass found nothing left to do. On SmolLM2
the fused graph is byte for byte the same and the fusion takes 5.1 instead of 6.7 s; the
tests compare both on every family of ``tests/test_families.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.ort_fusions import _core as ort_fusions_core
from onnxscript.rewriter.ort_fusions import optimize_for_ort, shape_optimization
from onnxscript.rewriter.rules.common import slice_split_rule

from fptq_compile.exporters.onnx_rewrites import (
    constant_initializer,
    fold_static_scales,
    int8_weights_from_float_tables,
    typed_like,
)

GQA = ("com.microsoft", "GroupQueryAttention")
ATTENTION_MASK = "attention_mask"
SKIP_RMS_NORM = ("com.microsoft", "SkipSimplifiedLayerNormalization")


@dataclass(frozen=True)
class OrtFusions:
    """What :func:`fuse_for_onnx_runtime` fused."""

    attention: int
    skip_rms_norm: int
    rms_norm_restored: int
    unfused_reason: str = ""
    """Why the export kept the unfused graph instead (the counts are then 0)."""
    attention_mask: bool = False
    """The model takes an ``attention_mask`` and its cache may be a longer, shared buffer."""
    folded_static_scales: int = 0
    """Static activation ``Div``/``Mul`` nodes folded into norm weights and int4 weight scales."""
    int8_weights_from_tables: int = 0
    """int8 weight-only layers whose codes ONNX Runtime computes from a float table of the file
    (a tied ``lm_head`` from the embedding) when the session starts, instead of stored."""


def fuse_for_onnx_runtime(model: ir.Model, num_layers: int) -> OrtFusions:
    """Fuse attention and residual norms into ONNX Runtime's ops, in place.

    Warns when fewer than ``num_layers`` attention blocks fused (another transformers
    version exports another attention pattern): the model stays correct, only slower.
    """
    with _without_quadratic_rules(), _lean_pre_optimization():
        optimize_for_ort(model)
    attention = [node for node in model.graph if (node.domain, node.op_type) == GQA]
    if len(attention) < num_layers:
        warnings.warn(
            f"ONNX Runtime attention fusion matched {len(attention)} of {num_layers} layers; the others run "
            "as separate ops (correct but slower). It is tested with transformers 5.18.",
            stacklevel=2,
        )
    masked = _only_attention_reads_the_cache(model)
    if masked:
        _lengths_from_attention_mask(model, attention)
    else:
        _seqlens_k_per_batch_row(model, attention)
    restored = _standard_rms_norms(model)
    skip_norms = sum((node.domain, node.op_type) == SKIP_RMS_NORM for node in model.graph)
    folded = fold_static_scales(model)
    from_tables = int8_weights_from_float_tables(model)
    return OrtFusions(
        len(attention),
        skip_norms,
        restored,
        attention_mask=masked,
        folded_static_scales=folded,
        int8_weights_from_tables=from_tables,
    )


@contextmanager
def _without_quadratic_rules() -> Iterator[None]:
    """onnxscript's default rewrite rules without ``slice_split_rule`` (see the module docstring)."""
    rules = tuple(rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule)
    with mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", rules):
        yield


@contextmanager
def _lean_pre_optimization() -> Iterator[None]:
    """onnxscript's preparation for its fusions as one optimizer pass and its shape rules
    (see the module docstring)."""

    def prepare(model: ir.Model) -> ir.Model:
        optimizer.optimize(model)
        shape_optimization.rules.apply_to_model(model)
        return model

    with mock.patch.object(ort_fusions_core, "_pre_optimize", prepare):
        yield


def _cache_inputs(model: ir.Model) -> list[ir.Value]:
    return [value for value in model.graph.inputs if (value.name or "").startswith("past_key_values.")]


def _is_length_of(node: ir.Node) -> bool:
    """``Shape(cache, start=2, end=3)``: the cache's length, the only thing read of it besides GQA."""
    attributes = node.attributes
    return node.op_type == "Shape" and attributes.get_int("start", 0) == 2 and attributes.get_int("end", -1) == 3


def _only_attention_reads_the_cache(model: ir.Model) -> bool:
    """Whether the cache inputs are read by ``GroupQueryAttention`` and for their length only."""
    cache = _cache_inputs(model)
    return bool(cache) and all(
        (use.node.domain, use.node.op_type) == GQA or _is_length_of(use.node) for value in cache for use in value.uses()
    )


def _lengths_from_attention_mask(model: ir.Model, attention: list[ir.Node]) -> None:
    """Add the ``attention_mask`` input; feed every GQA ``seqlens_k`` (row sums - 1, int32) and
    ``total_sequence_length`` (its length, int32) from it, and any other use of the cache's
    length (the position ids) from its length minus the new tokens'."""
    graph = model.graph
    mask = ir.Value(
        name=ATTENTION_MASK, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "total_sequence"])
    )
    graph.inputs.insert(1, mask)
    axis = constant_initializer(model, "fptq_mask_axis", np.array([1], np.int64))
    one = constant_initializer(model, "fptq_mask_one", np.array(1, np.int64))
    lengths = ir.node("ReduceSum", inputs=[mask, axis], attributes={"keepdims": 0})
    last = ir.node("Sub", inputs=[lengths.outputs[0], one])
    seqlens_k = ir.node("Cast", inputs=[last.outputs[0]], attributes={"to": ir.DataType.INT32})
    total = ir.node("Shape", inputs=[mask], attributes={"start": 1, "end": 2})
    total_int32 = ir.node("Cast", inputs=[total.outputs[0]], attributes={"to": ir.DataType.INT32})
    new = ir.node("Shape", inputs=[graph.inputs[0]], attributes={"start": 1, "end": 2})
    past = ir.node("Sub", inputs=[total.outputs[0], new.outputs[0]])
    graph.insert_before(graph.node(0), [lengths, last, seqlens_k, total, total_int32, new, past])
    for node in attention:
        node.replace_input_with(5, seqlens_k.outputs[0])
        node.replace_input_with(6, total_int32.outputs[0])
    for value in _cache_inputs(model):
        for use in value.uses():
            if _is_length_of(use.node):
                ir.convenience.replace_all_uses_with(use.node.outputs[0], past.outputs[0])
    _drop_unused_nodes(model)


def _drop_unused_nodes(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)


def _seqlens_k_per_batch_row(model: ir.Model, attention: list[ir.Node]) -> None:
    """Expand every GQA ``seqlens_k`` input (input 5) from ``[1]`` to ``[batch]``."""
    input_ids = model.graph.inputs[0]
    expanded: dict[ir.Value, ir.Value] = {}
    for node in attention:
        seqlens_k = node.inputs[5]
        if seqlens_k is None:
            continue
        if seqlens_k not in expanded:
            batch = ir.node("Shape", inputs=[input_ids], attributes={"start": 0, "end": 1})
            expand = ir.node("Expand", inputs=[seqlens_k, batch.outputs[0]])
            model.graph.insert_before(node, [batch, expand])
            expanded[seqlens_k] = expand.outputs[0]
        node.replace_input_with(5, expanded[seqlens_k])


def _standard_rms_norms(model: ir.Model) -> int:
    """Write ONNX-domain ``SimplifiedLayerNormalization`` as ``x * rsqrt(mean(x^2) + eps) * w``."""
    restored = 0
    for node in [n for n in model.graph if n.domain in ("", "ai.onnx") and n.op_type == "SimplifiedLayerNormalization"]:
        x, weight = node.inputs[0], node.inputs[1]
        if x is None or weight is None or node.attributes.get_int("axis", -1) != -1:
            continue
        epsilon = constant_initializer(
            model, f"fptq_rms_epsilon_{restored}", np.array(node.attributes.get_float("epsilon", 1e-5), np.float32)
        )
        axes = constant_initializer(model, "fptq_last_axis", np.array([-1], np.int64))
        square = ir.node("Mul", inputs=[x, x])
        mean = ir.node("ReduceMean", inputs=[square.outputs[0], axes], attributes={"keepdims": 1})
        shifted = ir.node("Add", inputs=[mean.outputs[0], epsilon])
        root = ir.node("Sqrt", inputs=[shifted.outputs[0]])
        inverse = ir.node("Reciprocal", inputs=[root.outputs[0]])
        normalized = ir.node("Mul", inputs=[x, inverse.outputs[0]])
        scaled = ir.node("Mul", inputs=[normalized.outputs[0], weight])
        model.graph.insert_before(node, [square, mean, shifted, root, inverse, normalized, scaled])
        typed_like(scaled.outputs[0], node.outputs[0])
        ir.convenience.replace_all_uses_with(node.outputs[0], scaled.outputs[0])
        model.graph.remove(node, safe=True)
        restored += 1
    return restored
