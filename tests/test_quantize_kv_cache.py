"""The int8 KV-cache pass on a tiny Llama: structure, numerics, contract, ONNX."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from conftest import tiny_llama

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.passes import quantize_kv_cache
from fptq_compile.runtime import OrtCausalLM

fptq_ops = torch.ops.fptq


def _compile(kv_cache_int8: bool = True) -> fptq.CompiledModel:
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32), kv_cache_int8=kv_cache_int8)
    return fptq.compile(tiny_llama(), ids, config, progress=False)


@pytest.fixture(scope="module")
def compiled() -> fptq.CompiledModel:
    return _compile()


def test_structure_every_cache_output_adds_int8_entries(compiled):
    assert compiled.report.pass_reports["quantize_kv_cache"]["quantized_cache_tensors"] == 4  # 2 layers x (k, v)
    (outputs,) = compiled.graph_module.graph.find_nodes(op="output")[0].args
    for present in outputs[1:]:
        assert present.target == torch.ops.aten.cat.default
        assert present.args[0][1].target == fptq_ops.dequantize_per_token.default
    assert compiled.plan.summary()["kv_cache"] == "int8"


def test_numerics_the_cache_holds_int8_values_and_cached_steps_match_whole_sequences(compiled):
    sequence = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    whole = compiled(sequence)
    logits, past = compiled.step(sequence[:, :7], compiled.kv_layout.empty(1))
    for position in range(7, 12):
        logits, past = compiled.step(sequence[:, position : position + 1], past)
        torch.testing.assert_close(logits[:, 0], whole[:, position], rtol=1e-4, atol=1e-4)
    # Every cached key and value row is an int8 grid: integers times one scale, the largest
    # code being 127 or -128.
    for key, value in past:
        for cached in (key, value):
            absmax = cached.abs().amax(dim=-1, keepdim=True)
            on_grid = [_is_integral(cached / (absmax / top)) for top in (127, 128)]
            assert (on_grid[0] | on_grid[1]).all()
    # And it is a real change: the float cache differs.
    float_cache = _compile(kv_cache_int8=False).step(sequence, compiled.kv_layout.empty(1))[1]
    assert not torch.allclose(float_cache[0][0], past[0][0])


def _is_integral(codes: torch.Tensor) -> torch.Tensor:
    return ((codes - codes.round()).abs() < 1e-3).all(dim=-1)


def test_contract_running_again_or_without_the_plan_changes_nothing(compiled):
    code = compiled.graph_module.code
    assert not quantize_kv_cache(compiled.graph_module, compiled.plan).modified
    assert compiled.graph_module.code == code
    without = dataclasses.replace(compiled.plan, kv_cache_int8=False)
    uncompiled = _compile(kv_cache_int8=False)
    code = uncompiled.graph_module.code
    assert not quantize_kv_cache(uncompiled.graph_module, without).modified
    assert uncompiled.graph_module.code == code
    targets = collections.Counter(n.target for n in uncompiled.graph_module.graph.nodes)
    assert targets[fptq_ops.quantize_per_token.default] < 8 + 4


def test_graph_without_a_cache_is_refused(compiled):
    from torch import fx

    graph = fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(fptq.UnsupportedGraphError, match="no \\(key, value\\) cache outputs"):
        quantize_kv_cache(graph, compiled.plan)


def test_onnx_runs_the_int8_cache_like_torch(compiled, tmp_path):
    with pytest.raises(fptq.ExportError, match="qdq layout only"):
        export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.ORT)
    assert not (tmp_path / "model.onnx").exists()
    export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.QDQ)
    session = OrtCausalLM.load(tmp_path / "model.onnx", exact=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    reference = compiled(ids)
    assert float((session(ids) - reference).abs().max() / reference.abs().max()) < 1e-3
    prompt = torch.tensor([3, 14, 15, 92])
    assert torch.equal(fptq.generate_ids(session, prompt, 8), fptq.generate_ids(compiled, prompt, 8))
