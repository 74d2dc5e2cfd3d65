"""Lowering a program to ONNX directly (no re-trace) or through torch.onnx's decomposition."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_llama, type_promotion_casts
from torch import nn

import fptq_compile as fptq
from fptq_compile.exporters import onnx_lowering
from fptq_compile.exporters.onnx_lowering import Route, lower
from fptq_compile.exporters.onnx_qdq import OPSET, io_names
from fptq_compile.runtime import OrtCausalLM


def _session(model: ir.Model, tmp_path, name: str) -> ort.InferenceSession:
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _shapes(values) -> list[tuple[str | None, list[object]]]:
    return [(value.name, [getattr(dim, "value", dim) for dim in value.shape]) for value in values]


@pytest.fixture(scope="module")
def compiled_llama() -> fptq.CompiledModel:
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32),
        activations=fptq.ActivationConfig(
            policy=fptq.ActivationPolicy.FPTQ, static_threshold=1.0, dynamic_threshold=10.0
        ),  # static, LAE and dynamic groups
    )
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return fptq.compile(tiny_llama(), ids, config, progress=False)


def test_a_compiled_llama_is_translated_directly_into_what_the_decomposition_gives(
    compiled_llama, tmp_path, monkeypatch
):
    program = compiled_llama.exported_program()
    assert compiled_llama.kv_layout is not None
    names = io_names(compiled_llama.kv_layout)
    signature = compiled_llama.example_signature()
    options = dict(opset=OPSET, dynamic_shapes=signature.dynamic_shapes, input_names=names[0], output_names=names[1])
    direct = lower(program, **options, optimize=True)
    monkeypatch.setattr(onnx_lowering, "untranslatable_op", lambda graph, registry: "forced for the test")
    decomposed = lower(program, **options, optimize=True)
    assert (direct.route, direct.reason) == (Route.DIRECT, "")
    assert (decomposed.route, decomposed.reason) == (Route.DECOMPOSED, "forced for the test")
    # The same ops, inputs, outputs and named dynamic axes ...
    ops = [collections.Counter(node.op_type for node in lowered.model.graph) for lowered in (direct, decomposed)]
    assert ops[0] == ops[1]
    assert ops[0]["QuantizeLinear"] > 0 and ops[0]["DequantizeLinear"] > 0
    for values in ("inputs", "outputs"):
        shapes = [_shapes(getattr(lowered.model.graph, values)) for lowered in (direct, decomposed)]
        assert shapes[0] == shapes[1]
    assert _shapes(direct.model.graph.inputs)[1] == ("past_key_values.0.key", ["batch", 2, "past_sequence", 16])
    assert direct.model.opset_imports[""] == OPSET
    # ... and the same numbers, the compiled graph's.
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    logits = []
    for lowered in (direct, decomposed):
        path = tmp_path / f"{lowered.route.value}.onnx"
        ir.save(lowered.model, path)
        logits.append(OrtCausalLM.load(path, exact=True)(ids).numpy())
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_allclose(logits[0], compiled_llama(ids).numpy(), rtol=0, atol=1e-4)


def test_lowering_leaves_the_program_unchanged(compiled_llama):
    program = compiled_llama.exported_program()
    before = program.graph_module.code
    signature = compiled_llama.example_signature()
    lowered = lower(
        program,
        opset=OPSET,
        dynamic_shapes=signature.dynamic_shapes,
        input_names=None,
        output_names=None,
        optimize=False,
    )
    assert lowered.route is Route.DIRECT
    assert program.graph_module.code == before  # assertions, aten.to and the dtypes as captured


class _Casts(nn.Module):
    """``aten.to`` in both overloads, which only the decomposition would rewrite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.to(torch.float16)
        return (half * 3).to(x) + x.type_as(half).float()


class _Masks(nn.Module):
    """Python's ``&`` and ``|`` on boolean tensors, as a sliding-window mask combines them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x > -1) & (x < 1) | (x > 2)
        return torch.where(inside, x, torch.zeros_like(x))


class _Mutates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y.add_(1.0)
        return y * 2


class _Std(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.std(-1, keepdim=True) + x  # aten.std.dim: torchlib translates only its decomposition


@pytest.mark.parametrize(
    ("module", "route", "reason"),
    [
        (_Casts(), Route.DIRECT, ""),
        (_Masks(), Route.DIRECT, ""),
        (_Mutates(), Route.DECOMPOSED, "aten.add_.Tensor (node add_) mutates its input"),
        (_Std(), Route.DECOMPOSED, "aten.std.dim (node std) has no ONNX translation of its own"),
    ],
)
def test_each_program_takes_the_route_its_ops_allow_and_computes_what_torch_does(module, route, reason, tmp_path):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("rows")},)
    program = torch.export.export(module, (x,), dynamic_shapes=dynamic)
    lowered = lower(program, opset=OPSET, dynamic_shapes=dynamic, input_names=["x"], output_names=["y"], optimize=True)
    assert lowered.route is route
    assert lowered.reason.startswith(reason)
    assert _shapes(lowered.model.graph.inputs) == [("x", ["rows", 8])]
    other = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))  # another number of rows
    (actual,) = _session(lowered.model, tmp_path, "m").run(["y"], {"x": other.numpy()})
    np.testing.assert_allclose(actual, module(other).numpy(), rtol=1e-3, atol=1e-3)


class _MixedDtypes(nn.Module):
    """float16 and float32 operands of one add: the type-promotion pass casts one of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.half() + x


class _OneDtype(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > x.mean(), x * x, x)


@pytest.mark.parametrize(
    ("module", "casts"),
    # ``half * 3`` and ``x > -1`` cast their int scalar, ``half + float`` one operand.
    [(_Casts(), True), (_Masks(), True), (_MixedDtypes(), True), (_OneDtype(), False)],
)
def test_the_type_promotion_check_agrees_with_the_pass_it_skips(module, casts):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(module, (x,))
    assert type_promotion_casts(program) == (casts, casts)


def test_a_compiled_llama_needs_no_type_promotion(compiled_llama):
    assert type_promotion_casts(compiled_llama.exported_program()) == (False, False)


def test_a_direct_translation_that_fails_falls_back_to_the_decomposition_and_says_why(monkeypatch, tmp_path):
    def broken(program):
        raise RuntimeError("an internal API changed")

    monkeypatch.setattr(onnx_lowering, "_as_decomposed", broken)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(_Casts(), (x,))
    lowered = lower(program, opset=OPSET, dynamic_shapes=None, input_names=["x"], output_names=["y"], optimize=True)
    assert lowered.route is Route.DECOMPOSED
    assert lowered.reason == "the direct translation failed (RuntimeError: an internal API changed)"
    (actual,) = _session(lowered.model, tmp_path, "m").run(["y"], {"x": x.numpy()})
    np.testing.assert_allclose(actual, _Casts()(x).numpy(), rtol=1e-3, atol=1e-3)


class _Slices(nn.Module):
    """Slices with integer bounds (negative, open, strided) and one with a symbolic bound."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = x[:, 1:5] + x[:, -4:] * x[:, ::2]
        return columns[: x.shape[0] - 1]


def test_integer_slice_bounds_are_constants_and_symbolic_ones_computed(tmp_path):
    module = _Slices()
    dynamic = ({0: torch.export.Dim("rows", min=3)},)
    program = torch.export.export(module, (torch.randn(4, 8),), dynamic_shapes=dynamic)
    lowered = lower(program, opset=OPSET, dynamic_shapes=dynamic, input_names=["x"], output_names=["y"], optimize=False)
    assert lowered.route is Route.DIRECT
    bounds = [
        [bound.producer().op_type if bound.producer() else "initializer" for bound in node.inputs[1:]]
        for node in lowered.model.graph
        if node.op_type == "Slice"
    ]
    # Each x[:, a:b] slices both dimensions; columns[: rows - 1] has a symbolic end.
    constant = ["Constant"] * 4
    (symbolic,) = [producers for producers in bounds if producers != constant]
    assert symbolic[1] != "Constant"  # the end, computed by torchlib's translation
    other = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    (actual,) = _session(lowered.model, tmp_path, "m").run(["y"], {"x": other.numpy()})
    np.testing.assert_array_equal(actual, module(other).numpy())
