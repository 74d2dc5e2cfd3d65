"""The ONNX rewrites on tiny hand-built graphs: structure, numerics in ONNX Runtime, contract."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import op_counts, optimized_by_ort
from onnx import TensorProto, helper, numpy_helper

from fptq_compile.exporters.onnx_rewrites import fold_static_scales, int8_weights_from_float_tables
from fptq_compile.runtime import session_options

FEATURES, OUTPUTS, BLOCK = 64, 16, 32
SCALE = 0.037


def _static_linear(gamma_readers: int = 1) -> onnx.ModelProto:
    """``Mul(x, gamma) -> Div(s) -> Q(1) -> DQ(1) -> Mul(s) -> MatMul(DQ(int4 W, w_scale))``, as
    the ``ort`` layout writes a static activation after an RMSNorm; ``gamma_readers`` > 1 gives
    the norm weight another reader (then it must not be folded)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (FEATURES, OUTPUTS)).astype(ml_dtypes.int4)
    weight_scale = rng.uniform(0.01, 0.1, (FEATURES // BLOCK, OUTPUTS)).astype(np.float32)
    tensors = {
        "gamma": rng.uniform(0.5, 2.0, FEATURES).astype(np.float32),
        "s": np.array(SCALE, np.float32),
        "one": np.array(1.0, np.float32),
        "zero": np.array(0, np.int8),
        "codes": codes,
        "w_scale": weight_scale,
    }
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["normed"]),
        helper.make_node("Div", ["normed", "s"], ["scaled"]),
        helper.make_node("QuantizeLinear", ["scaled", "one", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "one", "zero"], ["dq"]),
        helper.make_node("Mul", ["dq", "s"], ["activation"]),
        helper.make_node("DequantizeLinear", ["codes", "w_scale"], ["w"], axis=0, block_size=BLOCK),
        helper.make_node("MatMul", ["activation", "w"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, OUTPUTS])]
    if gamma_readers > 1:
        nodes.append(helper.make_node("Mul", ["x", "gamma"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 3, FEATURES]))
    graph = helper.make_graph(
        nodes,
        "static_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, FEATURES])],
        outputs,
        [numpy_helper.from_array(np.asarray(array), name) for name, array in tensors.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray, input_name: str = "x") -> np.ndarray:
    # Accuracy level 1: a fused MatMulNBits computes in float, as the unfused graph does.
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(exact=True), providers=["CPUExecutionProvider"]
    )
    return session.run(["y"], {input_name: x})[0]


def _op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_static_scale_folds_into_the_norm_weight_and_the_weight_scales(tmp_path):
    proto = _static_linear()
    model = ir.from_proto(proto)
    assert fold_static_scales(model) == 2
    assert _op_types(model) == ["Mul", "QuantizeLinear", "Cast", "DequantizeLinear", "MatMul"]
    folded = ir.to_proto(model)
    onnx.checker.check_model(folded, full_check=True)
    # No DequantizeLinear right in front of the MatMul: ONNX Runtime still fuses it into MatMulNBits.
    onnx.save(folded, tmp_path / "folded.onnx")
    assert op_counts(optimized_by_ort(tmp_path / "folded.onnx", tmp_path))["MatMulNBits"] == 1
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in folded.graph.initializer}
    original = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    np.testing.assert_array_equal(tensors["gamma"], original["gamma"] / np.float32(SCALE))
    np.testing.assert_array_equal(tensors["w_scale"], original["w_scale"] * np.float32(SCALE))
    x = 3 * np.random.default_rng(1).standard_normal((1, 3, FEATURES)).astype(np.float32)  # some codes saturate
    expected = _run(proto, x)
    np.testing.assert_allclose(_run(folded, x), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert fold_static_scales(model) == 0  # nothing left to fold


@pytest.mark.parametrize("shared", ["gamma", "w_scale"])
def test_a_tensor_read_elsewhere_is_not_folded(shared):
    proto = _static_linear(gamma_readers=2 if shared == "gamma" else 1)
    if shared == "w_scale":  # the weight scale is also a graph output's source
        proto.graph.node.append(helper.make_node("Identity", ["w_scale"], ["scale_copy"]))
        proto.graph.output.append(helper.make_tensor_value_info("scale_copy", TensorProto.FLOAT, None))
    model = ir.from_proto(proto)
    assert fold_static_scales(model) == 1  # the other of the two folds still applies
    kept = {"gamma": ("Div", "normed"), "w_scale": ("Mul", "dq")}[shared]  # the node left in place
    assert any((node.op_type, node.inputs[0].name) == kept for node in model.graph if node.inputs[0] is not None)
    x = np.random.default_rng(1).standard_normal((1, 3, FEATURES)).astype(np.float32)
    expected = _run(proto, x)
    np.testing.assert_allclose(_run(ir.to_proto(model), x), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_a_graph_without_static_activations_is_left_unchanged():
    proto = _static_linear()
    del proto.graph.node[1:5]  # no Q/DQ: Mul(x, gamma) -> MatMul
    proto.graph.node[-1].input[0] = "normed"
    model = ir.from_proto(proto)
    before = _op_types(model)
    assert fold_static_scales(model) == 0
    assert _op_types(model) == before


def _tied_int8_head(codes_offset: int = 0) -> onnx.ModelProto:
    """``Gather(table, ids) -> MatMul(DQ(codes, scale))`` with the codes the table quantized
    (to int8 in blocks along its rows), as a tied ``lm_head`` exports; ``codes_offset`` moves one code."""
    rng = np.random.default_rng(2)
    vocabulary = 24
    table = rng.standard_normal((vocabulary, FEATURES)).astype(np.float32)
    scale = (np.abs(table.reshape(vocabulary, -1, BLOCK)).max(-1) / np.float32(127.5)).astype(np.float32)
    codes = np.clip(np.rint(table / np.repeat(scale, BLOCK, axis=1)), -128, 127).astype(np.int8).T.copy()
    codes[0, 0] += codes_offset
    tensors = {"table": table, "codes_weight_int8": codes, "scale": np.ascontiguousarray(scale.T)}
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("DequantizeLinear", ["codes_weight_int8", "scale"], ["w"], axis=0, block_size=BLOCK),
        helper.make_node("MatMul", ["embedded", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied_head",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, vocabulary])],
        [numpy_helper.from_array(array, name) for name, array in tensors.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_int8_codes_of_a_float_table_are_computed_from_it_at_load(tmp_path):
    proto = _tied_int8_head()
    model = ir.from_proto(proto)
    assert int8_weights_from_float_tables(model) == 1
    assert _op_types(model) == ["Gather", "Transpose", "QuantizeLinear", "DequantizeLinear", "MatMul"]
    assert "codes_weight_int8" not in model.graph.initializers  # the file no longer holds the codes
    rewritten = ir.to_proto(model)
    onnx.checker.check_model(rewritten, full_check=True)
    # ONNX Runtime folds Transpose and QuantizeLinear into int8 codes and runs an 8-bit MatMulNBits.
    onnx.save(rewritten, tmp_path / "rewritten.onnx")
    optimized = optimized_by_ort(tmp_path / "rewritten.onnx", tmp_path)
    assert op_counts(optimized) == {"Gather": 1, "MatMulNBits": 1}
    ids = np.array([[0, 5, 23]])
    np.testing.assert_allclose(_run(rewritten, ids, "ids"), _run(proto, ids, "ids"), rtol=1e-6, atol=1e-6)
    assert int8_weights_from_float_tables(model) == 0  # nothing left to rewrite


def test_int8_codes_that_are_not_a_table_quantized_stay_stored():
    model = ir.from_proto(_tied_int8_head(codes_offset=1))  # one code off, as GPTQ would move it
    before = _op_types(model)
    assert int8_weights_from_float_tables(model) == 0
    assert _op_types(model) == before and "codes_weight_int8" in model.graph.initializers
