"""ONNX Runtime's fused transformer ops for the ``ort`` layout.

:func:`fuse_for_onnx_runtime` runs onnxscript's ``optimize_for_ort`` fusions on the
exported decoder and repairs two things they leave behind:

- rotary embedding + KV concat + grouped-head expand + attention become one
  ``com.microsoft.GroupQueryAttention`` per layer (q/k/v fed packed when they come from one
  merged MatMul, see :func:`~fptq_compile.exporters.onnx_rewrites.merge_parallel_matmuls`);
- residual add + RMSNorm become ``com.microsoft.SkipSimplifiedLayerNormalization``.

Repairs: the fusion derives GQA's ``seqlens_k`` from the position ids, which have one row
(``[1, S]``, broadcast over the batch), while ORT wants one entry per batch row, so it is
expanded to the batch size; and an RMSNorm with no residual in front of it is left as an
ONNX-domain ``SimplifiedLayerNormalization``, which ORT runs but ``onnx.checker`` does not
know, so it is written back in standard ops. The int4/int8 Q/DQ nodes are not touched: the
linears still fuse into ``MatMulNBits`` when the session starts.

The fusion runs without one of onnxscript's default rewrite rules,
``slice_split_rule`` (two ``Slice`` -> ``Split``): onnxscript 0.7 matches a rule with two
output nodes by indexing the whole graph for every node it tries, so that one rule costs
time quadratic in the node count. On SmolLM2 (3900 nodes when it first runs) it took 22 of
the fusion's 27 s, and dropping it leaves the fused graph the same (1086 nodes, the same
op counts): the exported rotary halves are ``Slice`` with steps, which it does not match.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter.ort_fusions import optimize_for_ort
from onnxscript.rewriter.rules.common import slice_split_rule

from fptq_compile.exporters.onnx_rewrites import constant_initializer, typed_like

GQA = ("com.microsoft", "GroupQueryAttention")
SKIP_RMS_NORM = ("com.microsoft", "SkipSimplifiedLayerNormalization")


@dataclass(frozen=True)
class OrtFusions:
    """What :func:`fuse_for_onnx_runtime` fused."""

    attention: int
    skip_rms_norm: int
    rms_norm_restored: int
    unfused_reason: str = ""
    """Why the export kept the unfused graph instead (the counts are then 0)."""


def fuse_for_onnx_runtime(model: ir.Model, num_layers: int) -> OrtFusions:
    """Fuse attention and residual norms into ONNX Runtime's ops, in place.

    Warns when fewer than ``num_layers`` attention blocks fused (another transformers
    version exports another attention pattern): the model stays correct, only slower.
    """
    with _without_quadratic_rules():
        optimize_for_ort(model)
    attention = [node for node in model.graph if (node.domain, node.op_type) == GQA]
    if len(attention) < num_layers:
        warnings.warn(
            f"ONNX Runtime attention fusion matched {len(attention)} of {num_layers} layers; the others run "
            "as separate ops (correct but slower). It is tested with transformers 5.18.",
            stacklevel=2,
        )
    _seqlens_k_per_batch_row(model, attention)
    restored = _standard_rms_norms(model)
    skip_norms = sum((node.domain, node.op_type) == SKIP_RMS_NORM for node in model.graph)
    return OrtFusions(len(attention), skip_norms, restored)


@contextmanager
def _without_quadratic_rules() -> Iterator[None]:
    """onnxscript's default rewrite rules without ``slice_split_rule`` (see the module docstring)."""
    rules = tuple(rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule)
    with mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", rules):
        yield


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
