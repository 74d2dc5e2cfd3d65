from __future__ import annotations

import math

import pytest
import torch

from fptq_compile import primitives


def test_symmetric_int4_groups_use_the_full_code_range_and_round_trip():
    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    groups = primitives.quantize_int4_groups(weight, group_size=128)
    assert groups.codes.dtype == torch.int8
    assert int(groups.codes.min()) >= -8 and int(groups.codes.max()) <= 7
    assert groups.scale.shape == (8, 2) and groups.zero_point is None
    # The absmax of each group maps to +-7.5, i.e. code 7 or -8.
    torch.testing.assert_close(groups.scale, weight.reshape(8, 2, 128).abs().amax(-1) / 7.5)
    restored = primitives.dequantize_groups(groups.codes, groups.scale, None, 128)
    assert primitives.sqnr_db(weight, restored) > 18.0


def test_partial_last_group_is_quantized_with_its_own_scale():
    # 576 = 4 x 128 + 64 (SmolLM2's hidden size): five groups, the last one partial.
    weight = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    weight[:, 512:] *= 100  # the partial group has its own, much larger range
    groups = primitives.quantize_int4_groups(weight, group_size=128)
    assert groups.scale.shape == (4, 5)
    torch.testing.assert_close(groups.scale[:, 4], weight[:, 512:].abs().amax(-1) / 7.5)
    restored = primitives.dequantize_groups(groups.codes, groups.scale, None, 128)
    assert restored.shape == weight.shape
    assert primitives.sqnr_db(weight[:, :512], restored[:, :512]) > 18.0


def test_asymmetric_int4_groups_cover_min_and_max_exactly():
    weight = torch.rand(6, 64, generator=torch.Generator().manual_seed(0)) + 0.5  # all positive
    groups = primitives.quantize_int4_groups(weight, group_size=32, symmetric=False)
    assert groups.zero_point is not None and groups.zero_point.shape == (6, 2)
    assert int(groups.codes.min()) >= -8 and int(groups.codes.max()) <= 7
    restored = primitives.dequantize_groups(groups.codes, groups.scale, groups.zero_point, 32)
    symmetric = primitives.quantize_int4_groups(weight, group_size=32, symmetric=True)
    symmetric_restored = primitives.dequantize_groups(symmetric.codes, symmetric.scale, None, 32)
    # A one-sided weight wastes half the symmetric grid: asymmetric must do better.
    assert primitives.sqnr_db(weight, restored) > primitives.sqnr_db(weight, symmetric_restored)


def test_rounding_is_half_to_even_like_onnx():
    codes = primitives.quantize_symmetric(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]), 1.0, -128, 127)
    assert codes.tolist() == [0, 2, 2, 0, -2]


def test_per_token_scale_is_each_rows_absmax_over_127_5():
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]])
    codes, scale = primitives.quantize_per_token(x)
    assert scale.shape == (1, 2, 1)
    assert scale[0, 0, 0].item() == pytest.approx(2.0 / 127.5)
    # -2 / (2 / 127.5) is -127.5 up to float32 rounding of the scale: -128 or -127.
    assert codes[0, 0, 0].item() == 64 and codes[0, 0, 2].item() == 32 and codes[0, 0, 1].item() in (-128, -127)
    assert codes[0, 1].tolist() == [0, 0, 0]  # an all-zero token does not divide by zero


def test_log_equalization_scale_follows_the_paper():
    absmax = torch.tensor([0.0, 1.0, 14.0, 100.0])
    scale = primitives.log_equalization_scale(absmax)
    assert scale[0].item() == 1.0
    for index in (1, 2, 3):
        value = absmax[index].item()
        assert scale[index].item() == pytest.approx(value / math.log2(2 + value), rel=1e-6)


def test_equalized_absmax_is_exact():
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 50, 16)
    channel_absmax = x.abs().amax(0)
    scale = primitives.log_equalization_scale(channel_absmax)
    assert primitives.equalized_absmax(channel_absmax, scale) == pytest.approx(float((x / scale).abs().max()), rel=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_loses_to_the_full_range_and_wins_on_gaussian_weights(symmetric):
    from fptq_compile.primitives import _group_view, dequantize_groups, quantize_int4_groups

    weight = torch.randn(32, 200, generator=torch.Generator().manual_seed(0))

    def group_errors(groups):
        restored = dequantize_groups(groups.codes, groups.scale, groups.zero_point, 64)
        return _group_view((restored - weight).square(), 64).sum(-1)

    full = group_errors(quantize_int4_groups(weight, 64, symmetric))
    searched = quantize_int4_groups(weight, 64, symmetric, clip_ratios=(0.9, 0.8, 0.7))
    assert searched.codes.min() >= -8 and searched.codes.max() <= 7
    assert bool((group_errors(searched) <= full).all())
    assert float(group_errors(searched).sum()) < float(full.sum())


def _group_squared_error(weight, groups, importance=None):
    """Per group: the squared error of the dequantized weight (each column's weighted by ``importance``)."""
    restored = primitives.dequantize_groups(groups.codes, groups.scale, groups.zero_point, groups.group_size)
    squared = (restored - weight).square()
    if importance is not None:
        squared = squared * importance
    return primitives._group_view(squared, groups.group_size).sum(dim=-1)


def _clipped(weight, group_size, symmetric, ratio):
    """Each group's range shrunk to ``ratio``, the whole weight quantized with it (the spec)."""
    grouped = primitives._group_view(weight, group_size)
    if symmetric:
        scale = torch.clamp(grouped.abs().amax(-1) * ratio, min=primitives.SCALE_FLOOR) / 7.5
        full_scale = primitives.expand_groups(scale, group_size, weight.shape[1])
        return primitives.WeightGroups(
            primitives.quantize_symmetric(weight, full_scale, -8, 7), scale, None, group_size
        )
    low = torch.clamp(grouped.amin(-1), max=0.0) * ratio
    high = torch.clamp(grouped.amax(-1), min=0.0) * ratio
    scale = torch.clamp(high - low, min=primitives.SCALE_FLOOR) / 15
    zero_point = torch.clamp(torch.round(-8 - low / scale), -8, 7).to(torch.int8)
    full_scale = primitives.expand_groups(scale, group_size, weight.shape[1])
    full_zero_point = primitives.expand_groups(zero_point, group_size, weight.shape[1]).float()
    codes = torch.clamp(torch.round(weight / full_scale) + full_zero_point, -8, 7).to(torch.int8)
    return primitives.WeightGroups(codes, scale, zero_point, group_size)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_keeps_for_each_group_the_range_a_full_quantization_finds_best(symmetric, weighted):
    """The search scores ranges on the grouped view; quantizing the whole weight with each
    ratio and keeping each group's smallest error (first on ties) gives the same bits."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 200, generator=generator) * torch.rand(200, generator=generator)  # a partial group
    importance = torch.rand(200, generator=generator) if weighted else None
    ratios = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    searched = primitives.quantize_int4_groups(weight, 64, symmetric, ratios, importance)
    best = primitives.quantize_int4_groups(weight, 64, symmetric)
    best_error = _group_squared_error(weight, best, importance)
    for ratio in ratios:
        candidate = _clipped(weight, 64, symmetric, ratio)
        error = _group_squared_error(weight, candidate, importance)
        taken = error < best_error
        best_error = torch.where(taken, error, best_error)
        codes = torch.where(primitives.expand_groups(taken, 64, 200), candidate.codes, best.codes)
        zero_point = None if symmetric else torch.where(taken, candidate.zero_point, best.zero_point)
        best = primitives.WeightGroups(codes, torch.where(taken, candidate.scale, best.scale), zero_point, 64)
    assert torch.equal(searched.codes, best.codes) and torch.equal(searched.scale, best.scale)
    assert symmetric or torch.equal(searched.zero_point, best.zero_point)


def test_clip_search_with_importance_minimizes_the_weighted_error():
    from fptq_compile.primitives import quantize_int4_groups

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    # A few inputs carry most of the energy, as outlier channels do.
    importance = torch.ones(128)
    importance[torch.randperm(128, generator=generator)[:6]] = 100.0
    ratios = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    weighted = quantize_int4_groups(weight, 32, False, ratios, importance=importance)
    plain = quantize_int4_groups(weight, 32, False, ratios)
    weighted_error = _group_squared_error(weight, weighted, importance)
    assert bool((weighted_error <= _group_squared_error(weight, plain, importance)).all())
    assert float(weighted_error.sum()) < float(_group_squared_error(weight, plain, importance).sum())
    with pytest.raises(ValueError, match="importance"):
        quantize_int4_groups(weight, 32, False, ratios, importance=torch.ones(5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_quantized_a_chunk_at_a_time_give_the_same_groups(monkeypatch, symmetric):
    weight = torch.randn(30, 64, generator=torch.Generator().manual_seed(4))
    importance = torch.rand(64, generator=torch.Generator().manual_seed(5))
    whole = primitives.quantize_int4_groups(weight, 16, symmetric, (0.9, 0.8), importance)
    monkeypatch.setattr(primitives, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows a chunk: the last one partial
    chunked = primitives.quantize_int4_groups(weight, 16, symmetric, (0.9, 0.8), importance)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scale, whole.scale)
    assert (chunked.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(chunked.zero_point, whole.zero_point)


def test_fake_int8_quantization_gives_the_dequantized_codes():
    x = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(6)) * 4
    per_token = primitives.per_token_scale(x)
    assert torch.equal(
        primitives.fake_quantize_int8(x, per_token), primitives.dequantize(*primitives.quantize_per_token(x))
    )
    for scale in (0.01, 0.05, 1.0):  # clipped and not
        codes = primitives.quantize_symmetric(x, scale, primitives.INT8_MIN, primitives.INT8_MAX)
        assert torch.equal(primitives.fake_quantize_int8(x, scale), primitives.dequantize(codes, scale))
        scratch = torch.empty_like(x)
        assert primitives.fake_quantize_int8(x, scale, out=scratch) is scratch
        assert torch.equal(scratch, primitives.dequantize(codes, scale))


def test_per_token_scale_takes_the_larger_magnitude_of_either_sign():
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(8))
    x[0, :, 3] = -50.0  # rows whose largest magnitude is negative
    expected = x.abs().amax(dim=-1, keepdim=True).clamp(min=primitives.SCALE_FLOOR) / 127.5
    assert torch.equal(primitives.per_token_scale(x), expected)


def test_sqnr_is_the_float64_ratio_of_signal_to_noise_energy():
    reference = torch.randn(300, 1000, generator=torch.Generator().manual_seed(9)) * 3
    approximation = reference + 0.01 * torch.randn(300, 1000, generator=torch.Generator().manual_seed(10))
    exact = 10 * torch.log10(
        reference.double().square().sum() / (reference.double() - approximation.double()).square().sum()
    )
    assert primitives.sqnr_db(reference, approximation) == pytest.approx(float(exact), abs=1e-5)
    assert primitives.sqnr_db(reference, reference.clone()) == float("inf")
    # bfloat16 inputs are measured in float32, float64 ones in float64.
    assert primitives.sqnr_db(reference.bfloat16(), approximation) == primitives.sqnr_db(
        reference.bfloat16().float(), approximation
    )
    assert primitives.sqnr_db(reference.double(), approximation.double()) == pytest.approx(float(exact), abs=1e-9)


@pytest.mark.parametrize(("shape", "group_size", "asymmetric"), [((12, 96), 32, False), ((10, 70), 32, True)])
def test_dequantized_groups_are_the_codes_times_their_repeated_scales(shape, group_size, asymmetric):
    generator = torch.Generator().manual_seed(7)
    codes = torch.randint(-8, 8, shape, generator=generator, dtype=torch.int8)
    groups = -(-shape[1] // group_size)
    scale = torch.rand(shape[0], groups, generator=generator)
    zero_point = torch.randint(-8, 8, (shape[0], groups), generator=generator, dtype=torch.int8) if asymmetric else None
    repeated = None if zero_point is None else primitives.expand_groups(zero_point, group_size, shape[1])
    expected = primitives.dequantize(codes, primitives.expand_groups(scale, group_size, shape[1]), repeated)
    restored = primitives.dequantize_groups(codes, scale, zero_point, group_size)
    assert torch.equal(restored, expected) and restored.is_contiguous()
