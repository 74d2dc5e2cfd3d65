"""Rewrites of the exported ONNX model (``onnx_ir``), applied after ``torch.onnx.export``.

- :func:`pack_int4_weights`: the int4 codes travel through the exporter in int8 tensors;
  here they become INT4 initializers (two values per byte on disk).
- :func:`int4_weights_k_major`: ``DequantizeLinear(W[N, K], axis=1) -> Transpose -> MatMul``
  becomes ``DequantizeLinear(W[K, N], axis=0) -> MatMul``, the layout ONNX Runtime CPU
  fuses into ``MatMulNBits``. Same numbers, data reordered.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fptq_compile.errors import ExportError


def _blocked_dequantize_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in model.graph
        if node.op_type == "DequantizeLinear" and node.attributes.get_int("block_size", 0) > 0
    ]


def _constant(value: ir.Value | None, node: ir.Node) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is None:
        raise ExportError(f"{node.name}: int4 weight input {value.name} is not an initializer")
    return value.const_value.numpy()


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    tensor = ir.tensor(array, name=value.name)
    value.const_value = tensor
    value.dtype = tensor.dtype
    value.shape = ir.Shape(array.shape)


def pack_int4_weights(model: ir.Model) -> int:
    """Store every blocked ``DequantizeLinear``'s int8-held codes (and zero points) as INT4."""
    packed = 0
    for node in _blocked_dequantize_nodes(model):
        for value in (node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None):
            array = _constant(value, node)
            if value is None or array is None or array.dtype != np.int8:
                continue
            if array.min() < -8 or array.max() > 7:
                raise ExportError(f"{node.name}: {value.name} holds values outside int4 [-8, 7]")
            _set_constant(value, array.astype(ml_dtypes.int4))
            packed += 1
    return packed


def int4_weights_k_major(model: ir.Model) -> int:
    """Rewrite ``DQ(W[N,K], axis=1) -> Transpose -> MatMul`` as ``DQ(W[K,N], axis=0) -> MatMul``."""
    rewritten = 0
    for node in _blocked_dequantize_nodes(model):
        axis = node.attributes["axis"].as_int()
        uses = list(node.outputs[0].uses())
        if axis != 1 or len(uses) != 1 or uses[0].node.op_type != "Transpose":
            continue
        transpose = uses[0].node
        if list(transpose.attributes["perm"].as_ints()) != [1, 0]:
            continue
        for value in node.inputs:
            array = _constant(value, node)
            if value is not None and array is not None:
                _set_constant(value, np.ascontiguousarray(array.T))
        node.attributes["axis"] = ir.AttrInt64("axis", 0)
        output = node.outputs[0]
        output.shape = ir.Shape(list(reversed(list(output.shape)))) if output.shape is not None else None
        ir.convenience.replace_all_uses_with(transpose.outputs[0], output)
        model.graph.remove(transpose, safe=True)
        rewritten += 1
    return rewritten


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return float(array) if array.size == 1 and array.dtype == np.float32 else None


def static_qdq_as_unit_scale(model: ir.Model) -> int:
    """Rewrite static ``Q(x, s) -> DQ(s)`` as ``Q(x / s, 1) -> DQ(1) * s``: the same numbers.

    ONNX Runtime CPU treats a ``DequantizeLinear`` with a real scale in front of a MatMul
    as a QDQ activation and then does not fuse the int4 weight into ``MatMulNBits``
    (the weight would be dequantized on every call); with unit scales the pair is plain
    rounding and the fusion happens. ``round((x / s) / 1) * 1 * s == round(x / s) * s``.
    """
    one = ir.Value(
        name="fptq_unit_scale", const_value=ir.tensor(np.array(1.0, dtype=np.float32), name="fptq_unit_scale")
    )
    rewritten = 0
    for quantize in [node for node in model.graph if node.op_type == "QuantizeLinear"]:
        scale = _scalar(quantize.inputs[1])
        consumers = [use.node for use in quantize.outputs[0].uses()]
        if scale is None or scale == 1.0 or not consumers:
            continue
        if any(node.op_type != "DequantizeLinear" or _scalar(node.inputs[1]) != scale for node in consumers):
            continue
        if one.name not in model.graph.initializers:
            model.graph.register_initializer(one)
        scale_value = quantize.inputs[1]
        assert scale_value is not None  # _scalar checked it
        divide = ir.node("Div", inputs=[quantize.inputs[0], scale_value])
        model.graph.insert_before(quantize, divide)
        quantize.replace_input_with(0, divide.outputs[0])
        quantize.replace_input_with(1, one)
        for dequantize in consumers:
            dequantize.replace_input_with(1, one)
            multiply = ir.node("Mul", inputs=[dequantize.outputs[0], scale_value])
            model.graph.insert_after(dequantize, multiply)
            for use in list(dequantize.outputs[0].uses()):
                if use.node is not multiply:
                    use.node.replace_input_with(use.idx, multiply.outputs[0])
        rewritten += 1
    return rewritten
