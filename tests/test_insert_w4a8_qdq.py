from __future__ import annotations

import collections

import pytest
import torch
from conftest import collect_stats, lae_everywhere_config

from fptq_compile.capture import select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig, WeightConfig, WeightRounding
from fptq_compile.errors import PreconditionError
from fptq_compile.passes import analyze_sensitivity, fold_log_equalization, insert_w4a8_qdq
from fptq_compile.passes.base import run_pass
from fptq_compile.primitives import sqnr_db

fptq_ops = torch.ops.fptq


def _plan(captured, token_ids, config):
    stats = collect_stats(captured, token_ids)
    linears, skipped = select_linears(captured.linears, config)
    return analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)


def _targets(graph_module):
    return collections.Counter(n.target for n in graph_module.graph.nodes if n.op == "call_function")


def _policy(policy, group_size=32):
    # Round to nearest: this pass quantizes the weights itself (GPTQ plans need gptq_weights first).
    weights = WeightConfig(group_size=group_size, rounding=WeightRounding.NEAREST)
    return CompileConfig(weights=weights, activations=ActivationConfig(policy=policy))


def test_structure_one_weight_dequant_per_linear_one_qdq_chain_per_group(captured, token_ids):
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.ALL_STATIC))
    result = insert_w4a8_qdq(captured.graph_module, plan)
    assert result.modified and result.report["quantized_linears"] == 14
    targets = _targets(captured.graph_module)
    assert targets[fptq_ops.dequantize_int4_groups.default] == 14
    assert targets[fptq_ops.quantize_per_tensor.default] == len(plan.groups) == 8
    assert targets[fptq_ops.dequantize_per_tensor.default] == 8
    assert targets[torch.ops.aten.linear.default] == 15  # lm_head kept float
    for layer in plan.layers:
        linear = next(n for n in captured.graph_module.graph.nodes if n.name == layer.node)
        assert linear.args[0].target == fptq_ops.dequantize_per_tensor.default
        assert linear.args[1].target == fptq_ops.dequantize_int4_groups.default
        codes = getattr(captured.graph_module, linear.args[1].args[0].target)
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_dynamic_groups_get_per_token_chains(captured, token_ids):
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.ALL_DYNAMIC))
    insert_w4a8_qdq(captured.graph_module, plan)
    targets = _targets(captured.graph_module)
    assert targets[fptq_ops.quantize_per_token.default] == 8
    assert targets[fptq_ops.dequantize_per_token.default] == 8
    assert targets[fptq_ops.quantize_per_tensor.default] == 0


def test_weight_only_leaves_activations_float(captured, token_ids):
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.WEIGHT_ONLY))
    insert_w4a8_qdq(captured.graph_module, plan)
    targets = _targets(captured.graph_module)
    assert targets[fptq_ops.dequantize_int4_groups.default] == 14
    assert targets[fptq_ops.quantize_per_tensor.default] + targets[fptq_ops.quantize_per_token.default] == 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_numerics_meet_an_sqnr_floor(llama, captured, token_ids, symmetric):
    config = CompileConfig(
        weights=WeightConfig(group_size=32, symmetric=symmetric, rounding=WeightRounding.NEAREST),
        activations=ActivationConfig(policy=ActivationPolicy.FPTQ),
    )
    plan = _plan(captured, token_ids, config)
    run_pass(insert_w4a8_qdq, captured.graph_module, plan)  # recompiles: the module runs the new graph
    with torch.no_grad():
        reference, quantized = llama(token_ids).logits, captured.logits(token_ids)
    # Measured ~50 dB on this random model; a broken scale or layout gives < 5 dB.
    assert sqnr_db(reference, quantized) > 15.0


def test_partial_last_group(token_ids):
    from conftest import tiny_llama

    from fptq_compile.capture import capture

    llama = tiny_llama(intermediate=80)  # down_proj in_features 80 = 64 + 16 with group 64
    captured = capture(llama)
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.ALL_DYNAMIC, group_size=64))
    run_pass(insert_w4a8_qdq, captured.graph_module, plan)
    down = next(layer for layer in plan.layers if layer.module_path.endswith("layers.0.mlp.down_proj"))
    scale = getattr(captured.graph_module, f"fptq_{down.node}_weight_scale")
    assert scale.shape == (64, 2)
    with torch.no_grad():
        assert sqnr_db(llama(token_ids).logits, captured.logits(token_ids)) > 15.0


def test_second_run_changes_nothing(captured, token_ids):
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.FPTQ))
    insert_w4a8_qdq(captured.graph_module, plan)
    captured.graph_module.recompile()
    code = captured.graph_module.code
    assert not insert_w4a8_qdq(captured.graph_module, plan).modified
    assert captured.graph_module.code == code


def test_lae_plan_without_folding_is_refused(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    config = lae_everywhere_config(stats)
    linears, skipped = select_linears(captured.linears, config)
    plan = analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)
    code = captured.graph_module.code
    with pytest.raises(PreconditionError, match="run fold_log_equalization first"):
        insert_w4a8_qdq(captured.graph_module, plan)
    captured.graph_module.recompile()
    assert captured.graph_module.code == code  # refused before any edit
    fold_log_equalization(captured.graph_module, plan)
    assert insert_w4a8_qdq(captured.graph_module, plan).modified


def test_quantized_graph_stays_exportable(captured, token_ids):
    plan = _plan(captured, token_ids, _policy(ActivationPolicy.FPTQ))
    insert_w4a8_qdq(captured.graph_module, plan)
    captured.graph_module.recompile()
    inputs = (token_ids, captured.kv_layout.empty(token_ids.shape[0]))
    exported = torch.export.export(captured.graph_module, inputs, strict=False)
    targets = collections.Counter(n.target for n in exported.graph.nodes if n.op == "call_function")
    assert targets[fptq_ops.dequantize_int4_groups.default] == 14
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), captured.graph_module(*inputs))
