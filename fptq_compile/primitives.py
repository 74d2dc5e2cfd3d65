"""Pure quantization math: no graphs, no modules, just tensors in and tensors out.

Shared by the torch ops (:mod:`fptq_compile.ops`), the passes and the exporters, so the
numbers are defined once. Conventions (those of DESIGN.md §6, compressed-tensors/torchao):

- int8 activations: symmetric, ``scale = absmax / 127.5``, codes clamped to [-128, 127];
- int4 weights: group-wise along the input dimension, symmetric ``scale = absmax / 7.5``
  with codes in [-8, 7], or asymmetric ``scale = (max - min) / 15`` with an int4 zero point;
- int8 weights (weight-only layers): group-wise, symmetric ``scale = absmax / 127.5``;
- rounding is ``round(x / scale)``, half to even, exactly as ONNX ``QuantizeLinear``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

INT8_MIN, INT8_MAX = -128, 127
INT4_MIN, INT4_MAX = -8, 7
INT8_SYMMETRIC_DIVISOR = 127.5
INT4_SYMMETRIC_DIVISOR = 7.5
INT4_ASYMMETRIC_DIVISOR = 15.0

# Smallest absmax a scale is computed from: keeps an all-zero group or token from dividing
# by zero without changing any code (every value of such a group quantizes to 0 anyway).
SCALE_FLOOR = 1e-8


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax)`` as int8 (round half to even, like ONNX)."""
    return torch.div(x, scale).round_().clamp_(qmin, qmax).to(torch.int8)  # in place on one temporary


def int8_scale_from_absmax(absmax: torch.Tensor | float) -> torch.Tensor:
    """The symmetric int8 scale for a range of ``[-absmax, absmax]``."""
    absmax_tensor = torch.as_tensor(absmax, dtype=torch.float32)
    return torch.clamp(absmax_tensor, min=SCALE_FLOOR) / INT8_SYMMETRIC_DIVISOR


def absmax(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim)``, computed as max(max x, -min x): two reductions and no |x|
    temporary as large as ``x`` (the same values)."""
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), x.amin(dim=dim, keepdim=keepdim).neg_())


def per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """The dynamic symmetric int8 scale of each row of the last dimension, shaped ``x[..., :1]``."""
    return torch.clamp(absmax(x, dim=-1, keepdim=True), min=SCALE_FLOOR) / INT8_SYMMETRIC_DIVISOR


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization with one scale per row of the last dimension.

    Returns ``(codes int8 shaped like x, scale float shaped x[..., :1])``.
    """
    scale = per_token_scale(x)
    return quantize_symmetric(x, scale, INT8_MIN, INT8_MAX), scale


def fake_quantize_int8(x: torch.Tensor, scale: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize_symmetric(x, scale, int8), scale)`` computed in float32 (the same
    values: the codes are exact in float), on one temporary: ``out`` when given (``x``'s
    shape; it may be ``x`` itself)."""
    return torch.div(x, scale, out=out).round_().clamp_(INT8_MIN, INT8_MAX).mul_(scale)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in the scale's float type (ONNX DequantizeLinear)."""
    values = codes.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)
    return values * scale


@dataclass(frozen=True)
class WeightGroups:
    """A weight ``[out_features, in_features]`` as int4 or int8 codes with per-group scales.

    ``codes`` holds the values in an int8 tensor (one value per byte; exporters pack int4
    codes two per byte). ``scale`` and ``zero_point`` are ``[out_features, n_groups]`` with
    ``n_groups = ceil(in_features / group_size)``: the last group is partial when the
    input size is not a multiple of the group size.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat ``[N, n_groups]`` values over their groups to ``[N, in_features]``."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def _group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` as ``[N, n_groups, group_size]``, the partial last group padded with zeros."""
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    padded = torch.nn.functional.pad(weight, (0, n_groups * group_size - in_features))
    return padded.reshape(out_features, n_groups, group_size)


# Elements of a weight quantized at once: bigger weights go a chunk of rows at a time.
CHUNK_ELEMENTS = 1 << 23


def quantize_int4_groups(
    weight: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    clip_ratios: Sequence[float] = (),
    importance: torch.Tensor | None = None,
) -> WeightGroups:
    """Round-to-nearest int4 quantization of ``weight [N, K]`` in groups along K.

    With ``clip_ratios``, each group's range is also tried shrunk to each of those
    fractions, and each group keeps the one whose dequantized values have the smallest
    squared error (MSE-searched clipping). ``importance [K]`` weights each input column's
    squared error: with the mean square of the inputs (the Hessian's diagonal), the search
    minimizes the output error a group adds, not its weight error. Zero padding of a
    partial last group never changes its range: symmetric groups use absmax, asymmetric
    ranges always include zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    weight = weight.detach().to(torch.float32)
    if importance is not None and importance.shape != (weight.shape[1],):
        raise ValueError(f"importance {tuple(importance.shape)} does not match weight {tuple(weight.shape)}")
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    if weight.shape[0] > rows:
        # Rows are quantized independently: a chunk at a time, the search's copies stay small.
        chunks = [
            quantize_int4_groups(weight[first : first + rows], group_size, symmetric, clip_ratios, importance)
            for first in range(0, weight.shape[0], rows)
        ]
        zero_points = [chunk.zero_point for chunk in chunks]
        return WeightGroups(
            torch.cat([chunk.codes for chunk in chunks]),
            torch.cat([chunk.scale for chunk in chunks]),
            None if zero_points[0] is None else torch.cat(zero_points),  # type: ignore[arg-type]
            group_size,
        )
    if not clip_ratios:
        return _quantize_int4_with(weight, group_size, *_int4_range(_group_view(weight, group_size), symmetric, 1.0))
    # The search runs on the grouped view, each group's scale broadcast over it: per ratio,
    # one error per group, and the codes computed once, for the best range of each group.
    grouped = _group_view(weight, group_size)
    weights = None if importance is None else _group_view(importance.to(torch.float32)[None], group_size)
    best_scale, best_zero_point = _int4_range(grouped, symmetric, 1.0)
    best_error = _grouped_squared_error(grouped, best_scale, best_zero_point, weights)
    for ratio in clip_ratios:
        scale, zero_point = _int4_range(grouped, symmetric, ratio)
        error = _grouped_squared_error(grouped, scale, zero_point, weights)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero_point is not None and zero_point is not None:
            best_zero_point = torch.where(better, zero_point, best_zero_point)
    return _quantize_int4_with(weight, group_size, best_scale, best_zero_point)


def _int4_range(grouped: torch.Tensor, symmetric: bool, ratio: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group ``[N, n_groups]`` of ``grouped [N, n_groups, g]``: the int4 scale (and zero
    point, asymmetric) of its range shrunk to ``ratio``."""
    if symmetric:
        clipped = absmax(grouped, dim=-1) * ratio
        return torch.clamp(clipped, min=SCALE_FLOOR) / INT4_SYMMETRIC_DIVISOR, None
    group_min = torch.clamp(grouped.amin(dim=-1), max=0.0) * ratio
    group_max = torch.clamp(grouped.amax(dim=-1), min=0.0) * ratio
    scale = torch.clamp(group_max - group_min, min=SCALE_FLOOR) / INT4_ASYMMETRIC_DIVISOR
    zero_point = torch.clamp(torch.round(INT4_MIN - group_min / scale), INT4_MIN, INT4_MAX).to(torch.int8)
    return scale, zero_point


def _grouped_squared_error(
    grouped: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, weights: torch.Tensor | None
) -> torch.Tensor:
    """Per group: the squared error of ``grouped`` quantized to int4 with ``scale`` (and
    ``zero_point``) and dequantized, each column's weighted by ``weights`` when given (the
    values :func:`_quantize_int4_with` and :func:`dequantize_groups` give, op for op)."""
    group_scale = scale[..., None]
    if zero_point is None:
        restored = torch.div(grouped, group_scale).round_().clamp_(INT4_MIN, INT4_MAX).mul_(group_scale)
    else:
        group_zero_point = zero_point[..., None].to(torch.float32)
        codes = torch.div(grouped, group_scale).round_().add_(group_zero_point).clamp_(INT4_MIN, INT4_MAX)
        restored = codes.sub_(group_zero_point).mul_(group_scale)
    squared = restored.sub_(grouped).square_()
    if weights is not None:
        squared = squared.mul_(weights)
    return squared.sum(dim=-1)


def _quantize_int4_with(
    weight: torch.Tensor, group_size: int, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> WeightGroups:
    """``weight`` as int4 codes with the given per-group ``scale`` (and ``zero_point``)."""
    full_scale = expand_groups(scale, group_size, weight.shape[1])
    if zero_point is None:
        codes = quantize_symmetric(weight, full_scale, INT4_MIN, INT4_MAX)
    else:
        full_zero_point = expand_groups(zero_point, group_size, weight.shape[1]).to(torch.float32)
        codes = torch.clamp(torch.round(weight / full_scale) + full_zero_point, INT4_MIN, INT4_MAX).to(torch.int8)
    return WeightGroups(codes=codes, scale=scale, zero_point=zero_point, group_size=group_size)


def quantize_int8_groups(weight: torch.Tensor, group_size: int) -> WeightGroups:
    """Round-to-nearest symmetric int8 quantization of ``weight [N, K]`` in groups along K."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.detach().to(torch.float32)
    scale = int8_scale_from_absmax(absmax(_group_view(weight, group_size), dim=-1))
    codes = quantize_symmetric(weight, expand_groups(scale, group_size, weight.shape[1]), INT8_MIN, INT8_MAX)
    return WeightGroups(codes=codes, scale=scale, zero_point=None, group_size=group_size)


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The float weight ``[N, K]`` that int4 or int8 ``codes`` and per-group ``scale`` stand for
    (``dequantize`` with the scales and zero points repeated over their groups: computed on
    the grouped view, each group's broadcast, with the same values)."""
    out_features, in_features = codes.shape
    values = _group_view(codes, group_size).to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)[..., None]
    restored = (values * scale[..., None]).reshape(out_features, -1)
    return restored if restored.shape[1] == in_features else restored[:, :in_features].contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 values held in int8 ``[..., K]`` as bytes ``[..., ceil(K / 2)]``, two per byte.

    Element ``2i`` goes in the low nibble and ``2i + 1`` in the high one (ONNX's INT4 order);
    an odd last element is padded with zero.
    """
    nibbles = codes.to(torch.uint8) & 0x0F
    if codes.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``length`` int4 values of each row, as int8."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :length]
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8)  # sign-extend 4 bits


def log_equalization_scale(channel_absmax: torch.Tensor) -> torch.Tensor:
    """FPTQ's logarithmic activation equalization scale, per input channel.

    ``s_j = max|X_j| / log2(2 + max|X_j|)``, with ``max|X_j|`` the channel's absolute
    maximum over the calibration data, as the paper writes it (llm-compressor derives
    its statistic from the channel's min–max range instead). Activations are divided by
    ``s`` and weight columns multiplied by it. A channel that never left zero gets
    ``s_j = 1``: any scale is exact for it, and 1 keeps the weights as they are.
    """
    absmax = channel_absmax.to(torch.float32)
    scale = absmax / torch.log2(2.0 + absmax)
    return torch.where(absmax > SCALE_FLOOR, scale, torch.ones_like(scale))


def equalized_absmax(channel_absmax: torch.Tensor, scale: torch.Tensor) -> float:
    """The per-tensor absmax of the activations after dividing channel j by ``scale[j]``.

    Exact, not an estimate: ``max_{t,j} |x_tj| / s_j = max_j (max_t |x_tj|) / s_j``.
    """
    return float((channel_absmax.to(torch.float32) / scale).max())


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better), computed in the inputs'
    common float type, at least float32, and summed as :func:`energy` sums."""
    dtype = torch.promote_types(torch.promote_types(reference.dtype, approximation.dtype), torch.float32)
    reference, approximation = reference.detach().to(dtype), approximation.detach().to(dtype)
    signal = energy(reference.square())
    return energy_sqnr_db(signal, energy((reference - approximation).square_()))


def energy_sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise): the SQNR in dB of summed signal and noise energies."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def energy(squares: torch.Tensor) -> float:
    """The sum of ``squares``: each row of the last dimension summed in its own type (torch's
    float32 reduction over thousands of terms is good to ~1e-7), the rows in float64 (over
    millions of terms a float32 sum drifts). Summing every term in float64 costs several
    times as much (converting and summing) and moves an SQNR by ~1e-8 dB."""
    return float(squares.sum(dim=-1).sum(dtype=torch.float64))
