"""The project's quantize/dequantize ops, registered as ``torch.ops.fptq.*``.

Each op is a ``torch.library.custom_op`` with a fake kernel, so a quantized graph stays
capturable by ``torch.export`` and each op maps 1:1 onto ONNX:

=====================================  =============================================
op                                     ONNX
=====================================  =============================================
``quantize_per_tensor(x, scale)``      ``QuantizeLinear`` (int8, scalar scale)
``dequantize_per_tensor(q, scale)``    ``DequantizeLinear``
``quantize_per_token(x)``              ``Abs/ReduceMax/Div`` + ``QuantizeLinear``
``dequantize_per_token(q, scale)``     ``DequantizeLinear`` / ``Mul``
``dequantize_int4_groups(q, s, zp, g)``  ``DequantizeLinear(block_size=g)`` on INT4
``dequantize_int8_groups(q, s, g)``      ``DequantizeLinear(block_size=g)`` on INT8
=====================================  =============================================

The kernels are the functions of :mod:`fptq_compile.primitives`, whose rounding and
ranges are exactly ONNX's, so the compiled torch graph is the numerical reference.
Importing this module registers the ops (the package imports it on first use).
"""

from __future__ import annotations

import torch

from fptq_compile import primitives


@torch.library.custom_op("fptq::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Static symmetric int8 quantization with one calibrated scale."""
    return primitives.quantize_symmetric(x, scale, primitives.INT8_MIN, primitives.INT8_MAX)


@quantize_per_tensor.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("fptq::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """Inverse of :func:`quantize_per_tensor`: ``codes * scale`` in float32."""
    return primitives.dequantize(codes, scale)


@dequantize_per_tensor.register_fake
def _(codes: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(codes, dtype=torch.float32)


@torch.library.custom_op("fptq::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization, one scale per token (last dimension)."""
    return primitives.quantize_per_token(x)


@quantize_per_token.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale_shape = (*x.shape[:-1], 1)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(scale_shape, dtype=torch.float32)


@torch.library.custom_op("fptq::dequantize_per_token", mutates_args=())
def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_per_token`."""
    return primitives.dequantize(codes, scale)


@dequantize_per_token.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(codes, dtype=torch.float32)


@torch.library.custom_op("fptq::dequantize_int4_groups", mutates_args=())
def dequantize_int4_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The float weight ``[N, K]`` of int4 codes (held in int8) with per-group scales."""
    return primitives.dequantize_groups(codes, scale, zero_point, group_size)


@dequantize_int4_groups.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int) -> torch.Tensor:
    return torch.empty_like(codes, dtype=torch.float32)


@torch.library.custom_op("fptq::dequantize_int8_groups", mutates_args=())
def dequantize_int8_groups(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float weight ``[N, K]`` of symmetric int8 codes with per-group scales (weight-only layers).

    Its own op, not ``dequantize_int4_groups`` with wider codes, so savers and exporters
    know from the graph which codes they may pack two per byte.
    """
    return primitives.dequantize_groups(codes, scale, None, group_size)


@dequantize_int8_groups.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty_like(codes, dtype=torch.float32)
