"""GPTQ (Frantar et al., arXiv 2210.17323) for int4 groups: pure math, no graphs.

GPTQ quantizes a weight ``[N, K]`` one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian
``H = X^T X / n`` of the linear's calibration inputs, so the layer's *output* error is
what is minimized rather than the weight error. Here the per-group scales and zero
points are fixed first, by round-to-nearest on the original weight (the "static groups"
variant): groups stay contiguous along K, as ONNX block-wise quantization and ORT's
``MatMulNBits`` require, so act-order (columns visited by decreasing ``H_jj``) needs no
column permutation at run time. GPTQ then only re-chooses the codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fptq_compile.primitives import INT4_MAX, INT4_MIN, WeightGroups, expand_groups

GRAM_ROW_BLOCKS = 8
""":func:`add_gram_upper` splits ``X^T X`` into this many row blocks (about 56 % of a full
product's FLOPs): measured 31-37 % faster than one full float32 product at SmolLM2's widths."""
GRAM_MIN_BLOCK_ROWS = 384
"""... and into row blocks of at least this many rows when it multiplies in bfloat16, whose
products are fast enough that smaller blocks cost more than they save (measured at widths
576 to 4096: one block at 576, four at 1536)."""


@contextlib.contextmanager
def _bfloat16_cpu_matmuls() -> Iterator[None]:
    """Let oneDNN run float32 matmuls on the CPU with bfloat16 inputs and float32 sums."""
    flags = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # set when torch.backends.mkldnn loads
    before = flags.fp32_precision
    flags.fp32_precision = "bf16"
    try:
        yield
    finally:
        flags.fp32_precision = before


def add_gram_upper(gram: torch.Tensor | None, x: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """Add ``r^T r`` for ``r [n, K]``, ``x`` rounded to ``input_dtype``, to ``gram [K, K]``
    (a new one of ``x``'s dtype if None), summed in ``x``'s dtype, on and above the diagonal
    only: one product per block of rows against the columns from the block on, so the
    blocks below the diagonal (the transposes of those above) are skipped.
    :func:`symmetric_from_upper` gives the whole matrix; below the diagonal ``gram`` holds no
    meaningful values.

    With ``input_dtype`` bfloat16 and ``x`` float32 the products of the rounded values are
    exact in float32, so the result is the same on every device up to the order of the
    float32 sums; oneDNN then multiplies them as bfloat16 where the CPU can (AVX-512 BF16,
    AMX): measured 2.4x faster than a float32 product at SmolLM2's down_proj width (1536) on
    a Xeon with AMX."""
    rounded = x if input_dtype == x.dtype else x.to(input_dtype).to(x.dtype)
    k = x.shape[1]
    if gram is None:
        gram = x.new_zeros(k, k)
    bfloat16_products = input_dtype == torch.bfloat16 and x.dtype == torch.float32
    blocks = min(GRAM_ROW_BLOCKS, max(1, k // GRAM_MIN_BLOCK_ROWS)) if bfloat16_products else GRAM_ROW_BLOCKS
    step = -(-k // blocks)
    with _bfloat16_cpu_matmuls() if bfloat16_products else contextlib.nullcontext():
        for start in range(0, k, step):
            gram[start : start + step, start:].addmm_(rounded[:, start : start + step].t(), rounded[:, start:])
    return gram


def symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix with ``upper``'s upper triangle (diagonal included)."""
    return torch.triu(upper) + torch.triu(upper, 1).t()


class HessianNotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor (too few or degenerate calibration inputs)."""


def gptq_int4_groups(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    nearest: WeightGroups,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> WeightGroups:
    """int4 codes for ``weight [N, K]`` chosen by GPTQ against ``hessian [K, K]``.

    ``nearest`` is the round-to-nearest quantization of ``weight``
    (:func:`quantize_int4_groups`, with any clipping): its scales and zero points are
    kept, so only the rounding differs. ``damp`` is added to the Hessian's diagonal as a
    fraction of its mean; ``act_order`` visits the columns by decreasing Hessian diagonal;
    ``block_size`` columns are updated together between lazy batch updates (speed only).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not match")
    if nearest.codes.shape != weight.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and its groups {tuple(nearest.codes.shape)} do not match")
    in_features = weight.shape[1]
    # An input that was always zero carries no information: its weights cannot matter.
    diagonal = hessian.diagonal().to(torch.float64)
    dead = diagonal == 0
    diagonal[dead] = 1.0  # as the Hessian gets below
    order = torch.argsort(diagonal, descending=True) if act_order else torch.arange(in_features)
    upper = _inverse_hessian_factor(hessian.detach(), order, dead[order], damp)
    # Output rows are independent under one Hessian: solved a chunk at a time, the working
    # copies stay small for a big model's stacked gate/up weights.
    codes = torch.empty(weight.shape, dtype=torch.int8)
    rows = max(1, CHUNK_ELEMENTS // in_features)
    for first in range(0, weight.shape[0], rows):
        last = min(first + rows, weight.shape[0])
        zero_point = None if nearest.zero_point is None else nearest.zero_point[first:last]
        grid = WeightGroups(nearest.codes[first:last], nearest.scale[first:last], zero_point, nearest.group_size)
        codes[first:last] = _solve_rows(weight[first:last], grid, order, dead, upper, block_size)
    return WeightGroups(codes, nearest.scale, nearest.zero_point, nearest.group_size)


# Elements of the float working copies GPTQ holds at once (rows of W^T, scales, zero points).
CHUNK_ELEMENTS = 1 << 23


def _solve_rows(
    weight: torch.Tensor,
    grid: WeightGroups,
    order: torch.Tensor,
    dead: torch.Tensor,
    upper: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """The int8-held int4 codes GPTQ chooses for the rows of ``weight`` on ``grid``, the
    columns visited in ``order`` against the inverse-Hessian factor ``upper``."""
    in_features = weight.shape[1]
    scale = expand_groups(grid.scale, grid.group_size, in_features)
    zero_point = torch.zeros_like(scale)
    if grid.zero_point is not None:
        zero_point = expand_groups(grid.zero_point, grid.group_size, in_features).to(torch.float32)
    # Work on W^T: one input column is one contiguous row.
    remaining = weight.detach().to(torch.float32).t().clone()
    remaining[dead] = 0.0
    remaining = remaining[order]
    scale, zero_point = scale.t()[order].contiguous(), zero_point.t()[order].contiguous()

    codes = torch.empty_like(remaining)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = remaining[start:stop].clone()
        errors = torch.empty_like(block)
        for row in range(stop - start):
            index = start + row
            values = block[row]
            code = torch.round(values / scale[index]).add_(zero_point[index]).clamp_(INT4_MIN, INT4_MAX)
            codes[index] = code
            error = errors[row]
            torch.sub(values, (code - zero_point[index]).mul_(scale[index]), out=error)
            error /= upper[index, index]
            # Compensate the columns of this block not yet quantized.
            block[row:].addr_(upper[index, index:stop], error, alpha=-1.0)
        # Lazy batch update: the rest of the matrix absorbs the whole block's error at once.
        remaining[stop:].addmm_(upper[start:stop, stop:].t(), errors, alpha=-1.0)
    return codes[torch.argsort(order)].t().to(torch.int8)


def output_error(weight: torch.Tensor, restored: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, ``(w - w_q) H (w - w_q)^T``: the mean squared error the rounding adds
    to that output over the inputs ``H`` was measured on."""
    difference = weight.to(torch.float32) - restored.to(torch.float32)
    return ((difference @ hessian.to(torch.float32)) * difference).sum(dim=1)


# Hessians up to this many inputs are factored in float64 (at most 128 MB a matrix); bigger
# ones in float32, as the GPTQ reference implementation does for all: a 3 B model's
# down_proj Hessian (8640 inputs) is 600 MB in float64, and its factoring holds two at once.
FLOAT64_MAX_INPUTS = 4096


def _inverse_hessian_factor(
    hessian: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32), ``H`` the
    Hessian with its rows and columns in ``order`` and a unit diagonal at the ``dead``
    inputs, factored in float64 up to ``FLOAT64_MAX_INPUTS`` inputs. Each intermediate is
    dropped as soon as it is used."""
    precision = torch.float64 if hessian.shape[0] <= FLOAT64_MAX_INPUTS else torch.float32
    # Rows and columns permuted in one gather, in the Hessian's own precision, then widened.
    permuted = hessian[order[:, None], order].to(precision)
    permuted[dead, dead] = 1.0
    permuted.diagonal().add_(damp * permuted.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(permuted)
    del permuted
    if int(info) != 0:
        raise HessianNotPositiveDefinite(f"the damped Hessian is not positive definite (damp={damp})")
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
