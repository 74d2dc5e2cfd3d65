"""The fusion check compares the fused ONNX model with the compiled graph with the
activation quantization taken out of both (exporters/onnx_fusion_check.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_llama
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.exporters.onnx_fusion_check import (
    FUSION_TOLERANCE,
    fusion_mismatch,
    without_activation_qdq,
    without_activation_quantization,
)
from fptq_compile.graph_utils import copied_graph
from fptq_compile.runtime import OrtCausalLM

fptq_ops = torch.ops.fptq


class QuantizedActivations(nn.Module):
    """A linear read through a static and a per-token int8 activation Q/DQ."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        static = fptq_ops.dequantize_per_tensor.default(fptq_ops.quantize_per_tensor.default(x, 0.05), 0.05)
        per_token = fptq_ops.quantize_per_token.default(x)
        dynamic = fptq_ops.dequantize_per_token.default(per_token[0], per_token[1])
        return self.linear(static) + self.linear(dynamic)


def test_without_activation_quantization_computes_in_float_and_leaves_the_graph_alone():
    module = QuantizedActivations()
    graph_module = fx.symbolic_trace(module)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    quantized = graph_module(x)
    float_activations = without_activation_quantization(graph_module)
    targets = {node.target for node in float_activations.graph.nodes}
    assert not targets & {getattr(fptq_ops, name).default for name in ("quantize_per_tensor", "quantize_per_token")}
    assert torch.equal(float_activations(x), module.linear(x) + module.linear(x))
    assert not torch.allclose(quantized, float_activations(x), atol=1e-4)
    assert torch.equal(graph_module(x), quantized)  # the original graph still quantizes
    assert float_activations.get_parameter("linear.weight") is module.linear.weight  # tensors shared


def _qdq_graph() -> ir.Model:
    """``x`` read twice through activation Q/DQ (unit scale + Cast; Div, unit scale Q/DQ, Mul),
    into a MatMul with a per-column int8 weight Q/DQ."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    column_scales = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "unit"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.array(0.25, np.float32), "scale"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(column_scales, "column_scales"),
        numpy_helper.from_array(np.zeros(4, np.int8), "column_zeros"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "unit", "zero"], ["codes_a"]),
        helper.make_node("Cast", ["codes_a"], ["a"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["scaled"]),
        helper.make_node("QuantizeLinear", ["scaled", "unit", "zero"], ["codes_b"]),
        helper.make_node("DequantizeLinear", ["codes_b", "unit", "zero"], ["unscaled"]),
        helper.make_node("Mul", ["unscaled", "scale"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("QuantizeLinear", ["weight", "column_scales", "column_zeros"], ["weight_codes"], axis=1),
        helper.make_node("DequantizeLinear", ["weight_codes", "column_scales", "column_zeros"], ["w"], axis=1),
        helper.make_node("MatMul", ["sum", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        initializers,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """``model`` as its ops define it (ORT's graph optimizations would quantize ``x`` for the MatMul)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_without_activation_qdq_takes_out_activation_codes_and_keeps_weight_codes():
    model = _qdq_graph()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32) * 20
    float_activations = without_activation_qdq(model)
    quantizers = [node.inputs[0].name for node in float_activations.graph if node.op_type == "QuantizeLinear"]
    assert quantizers == ["weight"]
    assert len(list(model.graph)) == 10  # the model itself is unchanged
    weight = model.graph.initializers["weight"].const_value.numpy()
    scales = model.graph.initializers["column_scales"].const_value.numpy()
    dequantized = np.clip(np.round(weight / scales), -128, 127) * scales
    np.testing.assert_allclose(_run(float_activations, x), (2 * x) @ dequantized, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_run(model, x), (2 * x) @ dequantized, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def compiled_and_fused(tmp_path_factory):
    activations = fptq.ActivationConfig(policy=fptq.ActivationPolicy.FPTQ, static_threshold=1.0, dynamic_threshold=10.0)
    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32), activations=activations)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    compiled = fptq.compile(tiny_llama(), ids, config, progress=False)
    folder = tmp_path_factory.mktemp("fused")
    export = export_onnx(compiled, folder / "model.onnx", OnnxLayout.ORT)
    assert export.fusions is not None and export.fusions.attention == 2
    without_qdq = folder / "without_qdq.onnx"
    ir.save(without_activation_qdq(ir.load(export.path)), without_qdq)
    return compiled, export.path, without_qdq


def _with_static_scales_times(compiled, factor: float):
    """``compiled`` with every static activation scale of its graph multiplied by ``factor``."""
    graph, outputs = copied_graph(compiled.graph_module)
    graph.output(outputs)
    for node in graph.nodes:
        if node.target in (fptq_ops.quantize_per_tensor.default, fptq_ops.dequantize_per_tensor.default):
            node.args = (node.args[0], node.args[1] * factor)
    return dataclasses.replace(compiled, graph_module=fx.GraphModule(compiled.graph_module, graph))


def test_rounding_differences_in_the_activations_alone_do_not_refuse_the_fusion(compiled_and_fused):
    """Where torch and ONNX Runtime round activations differently, the logits differ (through
    a deep model last-bit float differences flip roundings, and the flips add up; here the
    torch side's static scales are a quarter of the exported ones, so activations clip), but
    the fused graph still computes what the compiled graph does."""
    compiled, fused, without_qdq = compiled_and_fused
    rescaled = _with_static_scales_times(compiled, 0.25)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = rescaled(ids)
    quantized_difference = float((OrtCausalLM.load(fused)(ids) - reference).abs().max() / reference.abs().max())
    assert quantized_difference > 10 * FUSION_TOLERANCE
    assert fusion_mismatch(rescaled, fused, lambda: without_qdq) == ""
    assert fusion_mismatch(compiled, fused, lambda: without_qdq) == ""


def test_a_float_difference_refuses_the_fusion(compiled_and_fused):
    """A norm weight 1% off on the torch side, as a fusion that computes something else."""
    compiled, fused, without_qdq = compiled_and_fused
    graph, outputs = copied_graph(compiled.graph_module)
    graph.output(outputs)
    norm = next(n for n in graph.nodes if n.op == "get_attr" and "norm" in str(n.target))
    with graph.inserting_after(norm):
        changed = graph.call_function(torch.ops.aten.mul.Tensor, (norm, 1.01))
    norm.replace_all_uses_with(changed, delete_user_cb=lambda user: user is not changed)
    other = dataclasses.replace(compiled, graph_module=fx.GraphModule(compiled.graph_module, graph))
    assert "without activation quantization, the fused graph's prefill logits differ" in fusion_mismatch(
        other, fused, lambda: without_qdq
    )
