"""Rewrites of the exported ONNX model (``onnx_ir``), applied after ``torch.onnx.export``.

- :func:`pack_int4_weights`: the int4 codes travel through the exporter in int8 tensors;
  here they become INT4 initializers (two values per byte on disk).
- :func:`int4_weights_k_major`: ``DequantizeLinear(W[N, K], axis=1) -> Transpose -> MatMul``
  becomes ``DequantizeLinear(W[K, N], axis=0) -> MatMul``, the layout ONNX Runtime CPU
  fuses into ``MatMulNBits``. Same numbers, data reordered.
- :func:`static_qdq_as_unit_scale`: static Q/DQ pairs with unit scales between a Div and a
  Mul, so that fusion is not blocked.
- :func:`merge_parallel_matmuls`: MatMuls reading one activation become one wider MatMul.
- :func:`fold_static_scales` (after the fusions): a static activation's scale goes into the
  norm weight in front of it and the int4 weight scales behind it.
- :func:`int8_weights_from_float_tables` (after the fusions): int8 weight-only codes that
  are a float table of the file quantized (a tied ``lm_head``) are computed from it when
  the session starts instead of stored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from fptq_compile import primitives
from fptq_compile.errors import ExportError


def _blocked_dequantize_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in model.graph
        if node.op_type == "DequantizeLinear" and node.attributes.get_int("block_size", 0) > 0
    ]


def _constant(value: ir.Value | None, node: ir.Node) -> ir.TensorProtocol | None:
    if value is None:
        return None
    if value.const_value is None:
        raise ExportError(f"{node.name}: int4 weight input {value.name} is not an initializer")
    return value.const_value


def _derive(
    value: ir.Value,
    source: ir.TensorProtocol,
    function: Callable[[np.ndarray], np.ndarray],
    dtype: ir.DataType,
    shape: Sequence[int],
) -> None:
    """Make ``value`` hold ``function`` of ``source``'s data, computed when the data is read
    (when the model is saved), so that a big model's weights are never all in memory."""
    name = value.name

    def compute() -> ir.TensorProtocol:
        return ir.tensor(function(source.numpy()), name=name)

    value.const_value = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
    value.dtype = dtype
    value.shape = ir.Shape(shape)


# Names the W4A8 pass gives int4 weight tensors, and int8 weight-only codes.
INT4_TENSOR_SUFFIXES = ("_weight_int4", "_weight_zero_point")
INT8_WEIGHT_SUFFIX = "_weight_int8"


def pack_int4_weights(model: ir.Model) -> int:
    """Store every blocked ``DequantizeLinear``'s int4 codes and zero points, held in int8, as INT4."""
    packed = 0
    for node in _blocked_dequantize_nodes(model):
        for value in (node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None):
            tensor = _constant(value, node)
            if value is None or tensor is None or tensor.dtype != ir.DataType.INT8:
                continue
            if not (value.name or "").endswith(INT4_TENSOR_SUFFIXES):
                continue
            _derive(value, tensor, functools.partial(_as_int4, name=value.name), ir.DataType.INT4, _dims(tensor))
            packed += 1
    return packed


def _dims(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    """An initializer's shape (always static)."""
    return tuple(int(dim) for dim in tensor.shape.numpy())


def _as_int4(array: np.ndarray, name: str | None) -> np.ndarray:
    if array.min() < -8 or array.max() > 7:
        raise ExportError(f"{name} holds values outside int4 [-8, 7]")
    return array.astype(ml_dtypes.int4)


def _transposed(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)


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
            tensor = _constant(value, node)
            if value is not None and tensor is not None:
                _derive(value, tensor, _transposed, tensor.dtype, _dims(tensor)[::-1])
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
        activation = quantize.inputs[0]
        assert activation is not None  # a QuantizeLinear has its input
        divide = ir.node("Div", inputs=[activation, scale_value])
        typed_like(divide.outputs[0], activation)
        model.graph.insert_before(quantize, divide)
        quantize.replace_input_with(0, divide.outputs[0])
        quantize.replace_input_with(1, one)
        for dequantize in consumers:
            dequantize.replace_input_with(1, one)
            multiply = ir.node("Mul", inputs=[dequantize.outputs[0], scale_value])
            typed_like(multiply.outputs[0], activation)
            model.graph.insert_after(dequantize, multiply)
            for use in list(dequantize.outputs[0].uses()):
                if use.node is not multiply:
                    use.node.replace_input_with(use.idx, multiply.outputs[0])
        rewritten += 1
    return rewritten


def typed_like(value: ir.Value, like: ir.Value, shape: ir.Shape | None = None) -> ir.Value:
    """Give a new node's output ``like``'s element type and shape (or ``shape``), for shape inference."""
    value.shape = shape if shape is not None else like.shape
    if like.dtype is not None:
        value.dtype = like.dtype
    return value


@dataclass(frozen=True)
class _ConstantMatMul:
    """A MatMul whose right operand is constant: a float ``[K, N]`` initializer, the
    ``Transpose`` of a float ``[N, K]`` one (an export the optimizer has not folded yet), or a
    blocked ``DequantizeLinear(axis=0)`` of initializers (``tensors``: codes, scale, zero point)."""

    matmul: ir.Node
    dequantize: ir.Node | None
    tensors: tuple[ir.TensorProtocol, ...]
    transpose: ir.Node | None = None

    @property
    def out_features(self) -> int:
        return _dims(self.tensors[0])[1]

    def merge_key(self) -> tuple[object, ...]:
        """Equal for MatMuls that one wider MatMul can replace: same block size, dtypes and K."""
        block = None if self.dequantize is None else self.dequantize.attributes.get_int("block_size", 0)
        return (block, tuple((tensor.dtype, _dims(tensor)[0]) for tensor in self.tensors))


def _constant_matmul(node: ir.Node) -> _ConstantMatMul | None:
    weight = node.inputs[1]
    if weight is None:
        return None
    if weight.const_value is not None:
        tensor = weight.const_value
        return _ConstantMatMul(node, None, (tensor,)) if len(tensor.shape) == 2 else None
    transpose = weight.producer()
    if transpose is not None and transpose.op_type == "Transpose" and len(weight.uses()) == 1:
        source = transpose.inputs[0]
        if (
            source is None
            or source.const_value is None
            or len(source.const_value.shape) != 2
            or list(transpose.attributes.get_ints("perm", ())) != [1, 0]
        ):
            return None
        return _ConstantMatMul(node, None, (_transposed_lazily(source.const_value),), transpose)
    dequantize = weight.producer()
    if (
        dequantize is None
        or dequantize.op_type != "DequantizeLinear"
        or dequantize.attributes.get_int("block_size", 0) <= 0
        or dequantize.attributes.get_int("axis", 1) != 0
        or len(weight.uses()) != 1
    ):
        return None
    tensors = [value.const_value if value else None for value in dequantize.inputs]
    if any(tensor is None for tensor in tensors):
        return None
    return _ConstantMatMul(node, dequantize, tuple(tensor for tensor in tensors if tensor is not None))


def merge_parallel_matmuls(model: ir.Model) -> int:
    """Merge MatMuls that read one activation (q/k/v, gate/up) into one wide MatMul.

    ``MatMul(x, W_i)`` for i = 1..n, each ``W_i`` a ``[K, N_i]`` initializer, the ``Transpose``
    of an ``[N_i, K]`` one (float weights before the optimizer ran) or a blocked
    ``DequantizeLinear(axis=0)`` of one, becomes ``MatMul(x, concat(W_i))`` followed by one
    ``Slice`` per former output (on the last axis). Columns are independent and the int4
    blocks run along K, so the numbers are the same; ONNX Runtime then runs one
    ``MatMulNBits`` instead of n, and fuses sliced q/k/v into its attention op's packed
    input. Only ``[batch, sequence, features]`` activations are merged. Returns the number
    of merged groups.
    """
    by_input: dict[ir.Value, list[_ConstantMatMul]] = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[0] is not None:
            found = _constant_matmul(node)
            if found is not None:
                by_input.setdefault(node.inputs[0], []).append(found)
    merged = 0
    for activation, group in by_input.items():
        shape = group[0].matmul.outputs[0].shape
        if (
            len(group) < 2
            or len({member.merge_key() for member in group}) != 1
            or shape is None
            or len(shape) != 3
            or any(member.matmul.outputs[0].is_graph_output() for member in group)
        ):
            continue
        _merge_group(model, activation, group, f"fptq_merged_{merged}")
        merged += 1
    return merged


def constant_initializer(model: ir.Model, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """The initializer ``name`` holding ``array``, registered on first use (later calls reuse it)."""
    if name in model.graph.initializers:
        return model.graph.initializers[name]
    tensor = ir.tensor(array, name=name) if isinstance(array, np.ndarray) else array
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(_dims(tensor)), type=ir.TensorType(tensor.dtype))
    model.graph.register_initializer(value)
    return value


def _transposed_lazily(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    """``tensor`` (2-D) transposed when the data is read."""
    return ir.LazyTensor(
        lambda: ir.tensor(_transposed(tensor.numpy())), dtype=tensor.dtype, shape=ir.Shape(_dims(tensor)[::-1])
    )


def _concatenated(tensors: Sequence[ir.TensorProtocol], name: str) -> ir.LazyTensor:
    """``tensors`` side by side (along axis 1), concatenated when the data is read."""

    def compute() -> ir.TensorProtocol:
        return ir.tensor(np.concatenate([tensor.numpy() for tensor in tensors], axis=1), name=name)

    shape = ir.Shape([_dims(tensors[0])[0], sum(_dims(tensor)[1] for tensor in tensors)])
    return ir.LazyTensor(compute, dtype=tensors[0].dtype, shape=shape, name=name)


def _merge_group(model: ir.Model, activation: ir.Value, group: list[_ConstantMatMul], prefix: str) -> None:
    first = group[0]
    roles = zip("wsz", zip(*(member.tensors for member in group), strict=True), strict=False)
    weights = [
        constant_initializer(model, f"{prefix}_{role}", _concatenated(tensors, f"{prefix}_{role}"))
        for role, tensors in roles
    ]
    if first.dequantize is None:
        weight = weights[0]
    else:
        block_size = first.dequantize.attributes.get_int("block_size", 0)
        dequantize = ir.node("DequantizeLinear", inputs=weights, attributes={"axis": 0, "block_size": block_size})
        model.graph.insert_before(first.matmul, dequantize)
        weight = dequantize.outputs[0]
    matmul = ir.node("MatMul", inputs=[activation, weight])
    model.graph.insert_before(first.matmul, matmul)
    output = first.matmul.outputs[0]
    assert output.shape is not None  # merge_parallel_matmuls checked it
    out_features = sum(member.out_features for member in group)
    typed_like(matmul.outputs[0], output, ir.Shape([*list(output.shape)[:-1], out_features]))
    axes = constant_initializer(model, f"{prefix}_axes", np.array([2], dtype=np.int64))
    steps = constant_initializer(model, f"{prefix}_steps", np.array([1], dtype=np.int64))
    start = 0
    for position, member in enumerate(group):
        end = start + member.out_features
        starts = constant_initializer(model, f"{prefix}_{position}_start", np.array([start], dtype=np.int64))
        ends = constant_initializer(model, f"{prefix}_{position}_end", np.array([end], dtype=np.int64))
        piece = ir.node("Slice", inputs=[matmul.outputs[0], starts, ends, axes, steps])
        model.graph.insert_before(first.matmul, piece)
        typed_like(piece.outputs[0], member.matmul.outputs[0])
        ir.convenience.replace_all_uses_with(member.matmul.outputs[0], piece.outputs[0])
        start = end
    for member in group:
        producer = member.dequantize or member.transpose
        replaced = [member.matmul, *([producer] if producer else [])]
        constants = producer.inputs if producer else member.matmul.inputs[1:]
        model.graph.remove(replaced, safe=True)
        for value in constants:  # the separate weights, now unused
            if value is not None and value.name and value.name in model.graph.initializers and not value.uses():
                model.graph.initializers.pop(value.name)


# Normalizations whose output is ``normalized(x) * weight``, by (domain, op type): the
# weight's input position.
_NORM_WEIGHT_INPUT = {
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): 2,
    ("", "SimplifiedLayerNormalization"): 1,
    ("", "Mul"): 1,  # an RMSNorm in standard ops ends in Mul(normalized, weight)
}


def fold_static_scales(model: ir.Model) -> int:
    """Fold each static activation's scale into the tensors beside it (``ort`` layout).

    :func:`static_qdq_as_unit_scale` writes a static activation as
    ``Div(x, s) -> Q(1) -> DQ(1) -> Mul(s) -> MatMul(DQ(W, w_scale))``. Here

    - the ``Mul(s)`` goes into the int4 weights' scales, ``MatMul(DQ(W, w_scale * s))``, when
      every reader of the ``Mul`` is such a MatMul whose weight scale nothing else reads; the
      unit-scale ``DequantizeLinear`` becomes a ``Cast`` to float (the same numbers), because a
      ``DequantizeLinear`` right in front of the MatMul would stop ONNX Runtime from fusing it
      into ``MatMulNBits``;
    - the ``Div(x, s)`` goes into the norm in front of it, ``norm(x, weight / s)``, when only
      the ``Div`` reads the norm's output and only the norm reads its weight.

    Both are exact in real arithmetic (``round(x / s)`` and ``(q * s) @ W`` reassociated); in
    float32 an element may move by an ulp. A step runs two small nodes fewer per static
    activation after a norm, one fewer elsewhere. Returns the nodes removed.
    """
    removed = 0
    for quantize in [node for node in model.graph if node.op_type == "QuantizeLinear"]:
        divide = quantize.inputs[0].producer() if quantize.inputs[0] is not None else None
        if divide is None or divide.op_type != "Div" or _scalar(quantize.inputs[1]) != 1.0:
            continue
        scale = _scalar(divide.inputs[1])
        if scale is None:
            continue
        removed += _fold_into_weight_scales(model, quantize, scale)
        removed += _fold_into_norm_weight(model, divide, scale)
    return removed


def _fold_into_weight_scales(model: ir.Model, quantize: ir.Node, scale: float) -> int:
    """``Q(1) -> DQ(1) -> Mul(s) -> MatMul(DQ(W, w_scale))`` as ``Q(1) -> Cast ->
    MatMul(DQ(W, w_scale * s))``; 1 (node removed) if folded."""
    dequantize = _only_reader(quantize.outputs[0])
    multiply = _only_reader(dequantize.outputs[0]) if dequantize is not None else None
    if (
        dequantize is None
        or multiply is None
        or dequantize.op_type != "DequantizeLinear"
        or _scalar(dequantize.inputs[1]) != 1.0
        or multiply.op_type != "Mul"
        or multiply.inputs[0] is not dequantize.outputs[0]
        or _scalar(multiply.inputs[1]) != scale
        or multiply.outputs[0].is_graph_output()
    ):
        return 0
    readers = [use.node for use in multiply.outputs[0].uses()]
    found = [_constant_matmul(node) if node.op_type == "MatMul" else None for node in readers]
    weight_scales = [
        member.dequantize.inputs[1] if member is not None and member.dequantize is not None else None
        for member in found
    ]
    if (
        not readers
        or any(node.inputs[0] is not multiply.outputs[0] for node in readers)
        or any(value is None or value.const_value is None or len(value.uses()) != 1 for value in weight_scales)
    ):
        return 0
    for value in weight_scales:
        assert value is not None and value.const_value is not None  # checked above
        times = functools.partial(_times, factor=scale)
        _derive(value, value.const_value, times, ir.DataType.FLOAT, _dims(value.const_value))
    cast = ir.node("Cast", inputs=[quantize.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    model.graph.insert_before(dequantize, cast)
    typed_like(cast.outputs[0], multiply.outputs[0])
    ir.convenience.replace_all_uses_with(multiply.outputs[0], cast.outputs[0])
    model.graph.remove([multiply, dequantize], safe=True)
    return 1


def _only_reader(value: ir.Value) -> ir.Node | None:
    readers = [use.node for use in value.uses()]
    return readers[0] if len(readers) == 1 and not value.is_graph_output() else None


def _fold_into_norm_weight(model: ir.Model, divide: ir.Node, scale: float) -> int:
    """``norm(x, weight) -> Div(s)`` as ``norm(x, weight / s)``; 1 (node removed) if folded."""
    normalized = divide.inputs[0]
    norm = normalized.producer() if normalized is not None else None
    if normalized is None or norm is None or normalized is not norm.outputs[0]:
        return 0
    position = _NORM_WEIGHT_INPUT.get((norm.domain if norm.domain != "ai.onnx" else "", norm.op_type))
    weight = norm.inputs[position] if position is not None and len(norm.inputs) > position else None
    if (
        weight is None
        or weight.const_value is None
        or weight.const_value.dtype != ir.DataType.FLOAT
        or len(weight.uses()) != 1
        or len(normalized.uses()) != 1
        or normalized.is_graph_output()
    ):
        return 0
    divided = functools.partial(_divided, divisor=scale)
    _derive(weight, weight.const_value, divided, ir.DataType.FLOAT, _dims(weight.const_value))
    ir.convenience.replace_all_uses_with(divide.outputs[0], normalized)
    model.graph.remove(divide, safe=True)
    return 1


def _times(array: np.ndarray, factor: float) -> np.ndarray:
    return (array * np.float32(factor)).astype(np.float32)


def _divided(array: np.ndarray, divisor: float) -> np.ndarray:
    return (array / np.float32(divisor)).astype(np.float32)


def int8_weights_from_float_tables(model: ir.Model) -> int:
    """Let int8 weight-only codes that are a float initializer of the graph, quantized, be
    computed from it when the session starts instead of stored (``ort`` layout).

    A tied ``lm_head`` quantized to int8 (``int8_weight_only``) reads codes that round-to-
    nearest made of the embedding table, which the file holds in float32 anyway. When the
    codes are exactly ``QuantizeLinear`` of such a table with the layer's own scales, the
    blocked ``DequantizeLinear`` reads ``QuantizeLinear(Transpose(table))`` instead: ONNX
    Runtime folds the two into int8 codes when the session starts (and still fuses the
    ``DequantizeLinear -> MatMul`` into an 8-bit ``MatMulNBits``), and the file no longer
    holds the codes. Codes that match no table (GPTQ's, or an untied head) stay stored.
    Returns the number of weights rewritten.
    """
    tables = [
        value
        for value in model.graph.initializers.values()
        if value.const_value is not None
        and value.const_value.dtype == ir.DataType.FLOAT
        and len(value.const_value.shape) == 2
    ]
    rewritten = 0
    for dequantize in _blocked_dequantize_nodes(model):
        codes = dequantize.inputs[0]
        scale = dequantize.inputs[1]
        if (
            codes is None
            or scale is None
            or len(dequantize.inputs) > 2
            or dequantize.attributes.get_int("axis", 1) != 0
            or not (codes.name or "").endswith(INT8_WEIGHT_SUFFIX)
            or codes.const_value is None
            or scale.const_value is None
            or len(codes.uses()) != 1
        ):
            continue
        block_size = dequantize.attributes.get_int("block_size", 0)
        shape = _dims(codes.const_value)
        scales = np.repeat(scale.const_value.numpy(), block_size, axis=0)[: shape[0]]
        source = _table_quantizing_to(tables, codes.const_value.numpy(), scales)
        if source is None:
            continue
        transpose = ir.node("Transpose", inputs=[source], attributes={"perm": [1, 0]})
        quantize = ir.node(
            "QuantizeLinear",
            inputs=[transpose.outputs[0], scale],
            attributes={"axis": 0, "block_size": block_size, "output_dtype": ir.DataType.INT8},
        )
        model.graph.insert_before(dequantize, [transpose, quantize])
        transpose.outputs[0].shape = ir.Shape(shape)
        transpose.outputs[0].dtype = ir.DataType.FLOAT
        quantize.outputs[0].shape = ir.Shape(shape)
        quantize.outputs[0].dtype = ir.DataType.INT8
        dequantize.replace_input_with(0, quantize.outputs[0])
        if codes.name and codes.name in model.graph.initializers and not codes.uses():
            model.graph.initializers.pop(codes.name)
        rewritten += 1
    return rewritten


def _table_quantizing_to(tables: list[ir.Value], codes: np.ndarray, scales: np.ndarray) -> ir.Value | None:
    """The ``[N, K]`` float table whose transpose quantizes to ``codes [K, N]`` with ``scales``."""
    for table in tables:
        tensor = table.const_value
        if tensor is None or _dims(tensor) != codes.shape[::-1]:
            continue
        # The project's quantizer, whose rounding and range are ONNX QuantizeLinear's.
        quantized = primitives.quantize_symmetric(
            torch.from_numpy(tensor.numpy().T.copy()),  # a copy: the table's data may be read-only
            torch.from_numpy(scales),
            primitives.INT8_MIN,
            primitives.INT8_MAX,
        )
        if np.array_equal(quantized.numpy(), codes):
            return table
    return None
