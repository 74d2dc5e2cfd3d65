"""ONNX translations of the ``torch.ops.fptq`` ops, for ``torch.onnx.export``'s
``custom_translation_table``. Each is written with standard opset-21 ops and has
exactly the semantics of the op's torch kernel (:mod:`fptq_compile.primitives`):
``round(x / scale)`` half to even, saturated to int8.

And one aten op, ``slice.Tensor`` with integer bounds, whose torchlib translation casts and
reshapes each bound (8 nodes a slice that the optimizer folds again; SmolLM2: 720 of the
lowered graph's 4599 nodes, 0.5 s of the fusion's optimizer): here the bounds are constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import opset21 as op
from onnxscript.function_libs.torch_lib.ops.core import aten_slice

from fptq_compile import primitives

_INT8_ZERO = onnx.numpy_helper.from_array(np.array(0, dtype=np.int8), name="int8_zero")


def _zero_point() -> Any:
    return op.Constant(value=_INT8_ZERO)


def quantize_per_tensor(x: Any, scale: float) -> Any:
    return op.QuantizeLinear(x, op.Constant(value_float=scale), _zero_point())


def dequantize_per_tensor(codes: Any, scale: float) -> Any:
    return op.DequantizeLinear(codes, op.Constant(value_float=scale), _zero_point())


def quantize_per_token(x: Any) -> tuple[Any, Any]:
    """Per-row scale ``max(absmax, floor) / 127.5``, then ``QuantizeLinear(x / scale)``."""
    absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    floor = op.Constant(value_float=primitives.SCALE_FLOOR)
    scale = op.Div(op.Max(absmax, floor), op.Constant(value_float=primitives.INT8_SYMMETRIC_DIVISOR))
    codes = op.QuantizeLinear(op.Div(x, scale), op.Constant(value_float=1.0), _zero_point())
    return codes, scale


def dequantize_per_token(codes: Any, scale: Any) -> Any:
    return op.Mul(op.DequantizeLinear(codes, op.Constant(value_float=1.0), _zero_point()), scale)


def dequantize_int4_groups(codes: Any, scale: Any, zero_point: Any, group_size: int) -> Any:
    """Blocked ``DequantizeLinear`` along the input dim of ``[N, K]`` codes (int8 until packed)."""
    if zero_point is None:
        return op.DequantizeLinear(codes, scale, axis=1, block_size=group_size)
    return op.DequantizeLinear(codes, scale, zero_point, axis=1, block_size=group_size)


def dequantize_int8_groups(codes: Any, scale: Any, group_size: int) -> Any:
    """Blocked ``DequantizeLinear`` of int8 ``[N, K]`` codes (weight-only layers; never packed)."""
    return op.DequantizeLinear(codes, scale, axis=1, block_size=group_size)


_INT64_MAX = 2**63 - 1


def slice_tensor(x: Any, dim: int = 0, start: Any = None, end: Any = None, step: Any = 1) -> Any:
    """``aten.slice.Tensor``: ``Slice`` with constant bounds when they are integers;
    torchlib's translation when one is symbolic."""
    if not all(bound is None or isinstance(bound, int) for bound in (start, end, step)):
        return aten_slice(x, dim, start, end, step)
    first = 0 if start is None else start
    last = _INT64_MAX if end is None else min(end, _INT64_MAX)
    bounds = ([first], [last], [dim], [1 if step is None else step])
    return op.Slice(x, *(op.Constant(value_ints=value) for value in bounds))


TRANSLATION_TABLE: dict[Any, Any] = {
    torch.ops.aten.slice.Tensor: slice_tensor,
    torch.ops.fptq.quantize_per_tensor.default: quantize_per_tensor,
    torch.ops.fptq.dequantize_per_tensor.default: dequantize_per_tensor,
    torch.ops.fptq.quantize_per_token.default: quantize_per_token,
    torch.ops.fptq.dequantize_per_token.default: dequantize_per_token,
    torch.ops.fptq.dequantize_int4_groups.default: dequantize_int4_groups,
    torch.ops.fptq.dequantize_int8_groups.default: dequantize_int8_groups,
}
