"""Whether ONNX Runtime's fused graph computes what the compiled graph does.

The fusions (:mod:`~fptq_compile.exporters.onnx_ort_fusions`) rewrite float computations
(attention, norms, the static scales' places); the int8 roundings of the activations stay
the same ``QuantizeLinear`` ops. Comparing the fused model's logits with the compiled
graph's mixes the two: through a deep quantized model, last-bit float differences between
any two kernels flip int8 roundings, and the flips add up. On SmolLM2 the fused graph and
the unfused one alike differ from the compiled graph by 0.05-0.43 (relative max of the
logits) on a short prefill, from input to input and from compile to compile, so no
tolerance, nor a multiple of the unfused graph's own difference, tells a wrong fusion from
rounding flips.

So the check takes the activation quantization out of both sides, and compares what is
left, which differs by float rounding only: the compiled graph without its activation
quantize/dequantize ops (:func:`without_activation_quantization`) and the fused ONNX model
without its activation ``QuantizeLinear`` (:func:`without_activation_qdq`). The weights,
int4 or int8, stay quantized on both sides, and so does the model's every float
computation. The fused model itself, quantization included, must load and run in ONNX
Runtime with finite logits.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import fx

import fptq_compile.ops  # noqa: F401  (registers torch.ops.fptq)
from fptq_compile.capture import KVCache
from fptq_compile.graph_utils import copied_graph
from fptq_compile.pipeline import CompiledModel

# The fused model without activation quantization must give the compiled graph's logits
# without it within this relative max difference. Float rounding alone differs by 1e-7 to
# 4e-7 on the tiny test models and by 1e-5 to 3e-5 on SmolLM2's 30 layers; Gemma-2's
# attention fused as GroupQueryAttention (its soft-capping lost) by 0.033.
FUSION_TOLERANCE = 1e-3

_fptq = torch.ops.fptq
_DEQUANTIZE_OF = {
    _fptq.dequantize_per_tensor.default: _fptq.quantize_per_tensor.default,
    _fptq.dequantize_per_token.default: _fptq.quantize_per_token.default,
}

Logits = dict[str, torch.Tensor]


def without_activation_quantization(graph_module: fx.GraphModule) -> fx.GraphModule:
    """``graph_module`` (a copy sharing its tensors, called as it is) with every activation
    ``dequantize(quantize(x))`` replaced by ``x``: static per-tensor and per-token dynamic."""
    graph, outputs = copied_graph(graph_module)
    graph.output(outputs)
    for node in list(graph.nodes):
        quantize = _DEQUANTIZE_OF.get(node.target)
        if quantize is None:
            continue
        codes = node.args[0]
        if isinstance(codes, fx.Node) and codes.target is operator.getitem:  # per token: (codes, scale)
            codes = codes.args[0]
        if isinstance(codes, fx.Node) and codes.target == quantize:
            source = codes.args[0]
            assert isinstance(source, fx.Node)  # a quantize op reads a tensor
            node.replace_all_uses_with(source)
    float_activations = fx.GraphModule(graph_module, graph)
    float_activations.graph.eliminate_dead_code()
    float_activations.recompile()
    return float_activations


def without_activation_qdq(model: ir.Model) -> ir.Model:
    """A copy of ``model`` (sharing its tensors) without its activation quantization: every
    per-tensor ``QuantizeLinear`` whose codes are read back as they were scaled
    (``DequantizeLinear`` with its scale and zero point, or a ``Cast`` to float of codes
    with unit scale and zero point 0) is taken out, its reader's output replaced by its input.
    Per-channel and per-block codes (weights) stay."""
    copy = model.clone()
    for quantize in [node for node in copy.graph if node.op_type == "QuantizeLinear" and node.domain == ""]:
        scaling = _per_tensor_scaling(quantize)
        source = quantize.inputs[0]
        if scaling is None or source is None:
            continue
        for use in list(quantize.outputs[0].uses()):
            reader = use.node
            if reader.domain == "" and (
                (reader.op_type == "DequantizeLinear" and _per_tensor_scaling(reader) == scaling)
                or (
                    reader.op_type == "Cast"
                    and reader.attributes.get_int("to") == ir.DataType.FLOAT
                    and scaling == (1.0, 0.0)
                )
            ):
                ir.convenience.replace_all_uses_with(reader.outputs[0], source, replace_graph_outputs=True)
    RemoveUnusedNodesPass()(copy)
    return copy


def _per_tensor_scaling(node: ir.Node) -> tuple[float, float] | None:
    """The one scale and zero point of a ``QuantizeLinear`` or ``DequantizeLinear``; None
    when they are not one constant each."""
    scale = _scalar(node.inputs[1])
    zero_point = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0.0
    return None if scale is None or zero_point is None else (scale, zero_point)


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else None."""
    tensor = None if value is None else value.const_value
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def fusion_mismatch(compiled: CompiledModel, fused: Path, fused_without_qdq: Callable[[], Path | bytes]) -> str:
    """Why the fused model at ``fused`` does not compute what ``compiled`` does ("" if it
    does), on a 2 x 5-token prefill and one decoding step: the fused model must run, and
    without activation quantization (``fused_without_qdq`` gives it, saved or serialized)
    match the compiled graph without it within ``FUSION_TOLERANCE``."""
    assert compiled.kv_layout is not None  # only causal LMs are fused
    ids = torch.randint(0, 8, (2, 6), generator=torch.Generator().manual_seed(0))
    empty = compiled.kv_layout.empty(2)
    quantized = _ort_logits(fused, ids, empty)
    if isinstance(quantized, str):
        return f"ONNX Runtime fails on the fused graph ({quantized})"
    if not all(np.isfinite(logits.numpy()).all() for logits in quantized.values()):
        return "the fused graph's logits are not finite"
    expected = _logits(without_activation_quantization(compiled.graph_module), ids, empty)
    actual = _ort_logits(fused_without_qdq(), ids, empty)
    if isinstance(actual, str):
        return f"ONNX Runtime fails on the fused graph without activation quantization ({actual})"
    for name, logits in expected.items():
        error = float((actual[name] - logits).abs().max() / logits.abs().max())
        if not error <= FUSION_TOLERANCE:
            return (
                f"without activation quantization, the fused graph's {name} logits differ from the compiled "
                f"graph's by {error:.2g} (relative; tolerance {FUSION_TOLERANCE:g})"
            )
    return ""


def _logits(step: Callable[..., tuple[torch.Tensor, KVCache]], ids: torch.Tensor, empty: KVCache) -> Logits:
    """Logits of a prefill of ``ids[:, :-1]`` and a decoding step of the last ids."""
    with torch.no_grad():
        prefill, past = step(ids[:, :-1], empty)
        decoding, _ = step(ids[:, -1:], past)
    return {"prefill": prefill, "decoding": decoding}


def _ort_logits(model: Path | bytes, ids: torch.Tensor, empty: KVCache) -> Logits | str:
    """:func:`_logits` of the ONNX model (its file, or serialized) in ONNX Runtime (exact:
    int4 products in float, as the compiled graph computes them), or why ONNX Runtime fails on it."""
    from fptq_compile.runtime import OrtCausalLM

    try:
        return _logits(OrtCausalLM.load(model, exact=True).step, ids, empty)
    except Exception as error:  # ONNX Runtime refuses the graph: say how
        return f"{type(error).__name__}: {str(error)[:200]}"
