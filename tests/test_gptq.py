"""GPTQ's math on plain tensors: same grid as round to nearest, lower output error."""

from __future__ import annotations

import pytest
import torch

from fptq_compile import gptq
from fptq_compile.gptq import HessianNotPositiveDefinite, gptq_int4_groups, output_error
from fptq_compile.primitives import dequantize_groups, quantize_int4_groups


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as a linear sees after a norm."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    inputs = torch.randn(tokens, features, generator=generator) @ (torch.eye(features) + mixing)
    inputs[:, :3] *= 8.0
    return inputs


def _restored(groups):
    return dequantize_groups(groups.codes, groups.scale, groups.zero_point, groups.group_size)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_nearest_grid_and_lowers_the_output_error(symmetric, act_order):
    inputs = _correlated_inputs(512, 96)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    nearest = quantize_int4_groups(weight, 32, symmetric)
    solved = gptq_int4_groups(weight, hessian, nearest, act_order=act_order)
    assert torch.equal(solved.scale, nearest.scale)
    if symmetric:
        assert solved.zero_point is None
    else:
        assert torch.equal(solved.zero_point, nearest.zero_point)
    assert solved.codes.dtype == torch.int8 and int(solved.codes.min()) >= -8 and int(solved.codes.max()) <= 7
    gptq_error = output_error(weight, _restored(solved), hessian).sum()
    nearest_error = output_error(weight, _restored(nearest), hessian).sum()
    assert gptq_error < 0.8 * nearest_error
    # The output error is what it measures: the mean squared error of X (W - Q)^T.
    direct = ((inputs @ (weight - _restored(solved)).t()) ** 2).mean(dim=0).sum()
    assert torch.allclose(gptq_error, direct, rtol=1e-3)


def test_uncorrelated_inputs_leave_nothing_to_compensate():
    # A diagonal Hessian couples no columns: GPTQ then rounds to nearest, code for code.
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5)
    nearest = quantize_int4_groups(weight, 16, False)
    assert torch.equal(gptq_int4_groups(weight, hessian, nearest).codes, nearest.codes)


def test_inputs_that_never_fire_do_not_break_the_solve():
    inputs = _correlated_inputs(256, 64)
    inputs[:, 10] = 0.0
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    solved = gptq_int4_groups(weight, hessian, quantize_int4_groups(weight, 32, False))
    assert torch.isfinite(_restored(solved)).all()


def test_block_size_changes_speed_not_the_result():
    inputs = _correlated_inputs(256, 64)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    nearest = quantize_int4_groups(weight, 32, False)
    whole = gptq_int4_groups(weight, hessian, nearest, block_size=64)
    blocked = gptq_int4_groups(weight, hessian, nearest, block_size=16)
    assert (whole.codes != blocked.codes).float().mean() < 0.01  # float summation order only


def test_a_hessian_without_a_cholesky_factor_is_refused():
    weight = torch.randn(4, 8)
    nearest = quantize_int4_groups(weight, 8, False)
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_int4_groups(weight, -torch.eye(8), nearest)
    with pytest.raises(ValueError, match="do not match"):
        gptq_int4_groups(weight, torch.eye(6), nearest)
    with pytest.raises(ValueError, match="do not match"):
        gptq_int4_groups(weight, torch.eye(8), quantize_int4_groups(torch.randn(4, 6), 8, False))


def test_rows_solved_a_chunk_at_a_time_give_the_same_codes(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 64, generator=generator)
    inputs = torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    hessian = inputs.t() @ inputs / 256
    nearest = quantize_int4_groups(weight, 16, False, (0.9, 0.8))
    whole = gptq_int4_groups(weight, hessian, nearest)
    monkeypatch.setattr(gptq, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a chunk: the last one partial
    chunked = gptq_int4_groups(weight, hessian, nearest)
    assert torch.equal(chunked.codes, whole.codes)


def test_a_big_hessian_is_factored_in_float32_to_nearly_the_same_codes(monkeypatch):
    inputs = _correlated_inputs(1024, 256)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(6))
    nearest = quantize_int4_groups(weight, 64, False)
    factored = []
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda matrix: factored.append(matrix.dtype) or cholesky_ex(matrix)
    )
    in_float64 = gptq_int4_groups(weight, hessian, nearest)
    monkeypatch.setattr(gptq, "FLOAT64_MAX_INPUTS", 255)  # this Hessian now counts as big
    in_float32 = gptq_int4_groups(weight, hessian, nearest)
    assert factored == [torch.float64, torch.float32]
    assert (in_float32.codes != in_float64.codes).float().mean() < 0.01
    errors = [output_error(weight, _restored(solved), hessian).sum() for solved in (in_float32, in_float64)]
    assert torch.allclose(errors[0], errors[1], rtol=0.01)


@pytest.mark.parametrize("width", [5, 37, 64])
def test_the_upper_gram_accumulated_over_batches_gives_x_transpose_x(width):
    x = torch.randn(3, 50, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    gram = None
    for batch in x:
        gram = gptq.add_gram_upper(gram, batch, torch.float64)
    assert gram is not None
    tokens = x.reshape(-1, width)
    expected = tokens.t() @ tokens
    torch.testing.assert_close(gptq.symmetric_from_upper(gram), expected, rtol=1e-12, atol=1e-10)
    assert not torch.allclose(gram, expected)  # the blocks below the diagonal were skipped


@pytest.mark.parametrize("width", [576, 1536])  # one row block, four
def test_a_bfloat16_gram_is_that_of_the_rounded_inputs_summed_in_float32(width):
    x = torch.randn(512, width, generator=torch.Generator().manual_seed(width)) * 3
    gram = gptq.symmetric_from_upper(gptq.add_gram_upper(None, x, torch.bfloat16))
    rounded = x.to(torch.bfloat16).double()
    expected = rounded.t() @ rounded
    unrounded = x.double().t() @ x.double()
    scale = expected.abs().max()
    assert gram.dtype == torch.float32
    assert (gram.double() - expected).abs().max() / scale < 1e-6  # float32 sums of exact products
    assert (unrounded - expected).abs().max() / scale > 1e-5  # the rounding is there to see
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the setting is put back
