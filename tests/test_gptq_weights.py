"""The GPTQ pass on a tiny Llama graph: structure, numerics, contract."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import collect_stats, lae_everywhere_config

import fptq_compile as fptq
from fptq_compile.capture import select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig, WeightConfig, WeightRounding
from fptq_compile.errors import PreconditionError
from fptq_compile.metadata import get_linear_state
from fptq_compile.passes import analyze_sensitivity, fold_log_equalization, gptq_weights, insert_w4a8_qdq
from fptq_compile.passes.gptq_weights import _input_hessian
from fptq_compile.primitives import sqnr_db

fptq_ops = torch.ops.fptq


def _config(policy=ActivationPolicy.ALL_DYNAMIC, gptq=True):
    return CompileConfig(
        weights=WeightConfig(group_size=32, rounding=WeightRounding.GPTQ if gptq else WeightRounding.NEAREST),
        activations=ActivationConfig(policy=policy),
    )


def _plan(captured, stats, config):
    linears, skipped = select_linears(captured.linears, config)
    return analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)


def _node(graph_module, name):
    return next(n for n in graph_module.graph.nodes if n.name == name)


def test_structure_every_planned_weight_reads_int4_groups_and_activations_stay_for_later(captured, token_ids):
    stats = collect_stats(captured, token_ids, hessians=True)
    plan = _plan(captured, stats, _config())
    assert all(layer.weight.gptq for layer in plan.layers)
    result = gptq_weights(captured.graph_module, plan, stats)
    assert result.modified and result.report["gptq_linears"] == len(plan.layers) == 14
    targets = collections.Counter(n.target for n in captured.graph_module.graph.nodes)
    assert targets[fptq_ops.dequantize_int4_groups.default] == 14
    assert targets[fptq_ops.quantize_per_token.default] == 0  # activations are insert_w4a8_qdq's job
    for layer in plan.layers:
        linear = _node(captured.graph_module, layer.node)
        assert get_linear_state(linear).weight_quantized and not get_linear_state(linear).quantized
    # insert_w4a8_qdq then quantizes the activations and keeps GPTQ's weights.
    insert_w4a8_qdq(captured.graph_module, plan)
    targets = collections.Counter(n.target for n in captured.graph_module.graph.nodes)
    assert targets[fptq_ops.dequantize_int4_groups.default] == 14
    assert targets[fptq_ops.quantize_per_token.default] == len(plan.groups)


def test_numerics_gptq_beats_round_to_nearest_on_the_calibration_outputs(llama, captured, token_ids):
    stats = collect_stats(captured, token_ids, hessians=True)
    plan = _plan(captured, stats, _config(ActivationPolicy.WEIGHT_ONLY))
    report = gptq_weights(captured.graph_module, plan, stats).report
    for layer in plan.layers:
        assert report["output_sqnr_db"][layer.node] >= report["rtn_output_sqnr_db"][layer.node] - 0.01
    gains = [report["output_sqnr_db"][n] - report["rtn_output_sqnr_db"][n] for n in report["output_sqnr_db"]]
    assert sum(gains) / len(gains) > 0.5
    # And the model on the calibration tokens is closer to float than with round to nearest.
    rtn = _config(ActivationPolicy.WEIGHT_ONLY, gptq=False)
    rounded = fptq.compile(llama, token_ids, rtn, progress=False)
    solved = fptq.compile(llama, token_ids, _config(ActivationPolicy.WEIGHT_ONLY), progress=False)
    with torch.no_grad():
        reference = llama(token_ids).logits
        assert sqnr_db(reference, solved(token_ids)) > sqnr_db(reference, rounded(token_ids))


def test_lae_folded_groups_use_the_folded_inputs_hessian(captured, token_ids):
    stats = collect_stats(captured, token_ids, hessians=True)
    config = lae_everywhere_config(stats, rounding=WeightRounding.GPTQ)
    plan = _plan(captured, stats, config)
    lae_groups = [group for group in plan.groups if group.lae_scale is not None]
    assert lae_groups
    with pytest.raises(PreconditionError, match="run fold_log_equalization before gptq_weights"):
        gptq_weights(captured.graph_module, plan, stats)
    fold_log_equalization(captured.graph_module, plan)
    # The Hessian the pass derives from the unfolded statistics equals one measured after the fold.
    measured_after_fold = collect_stats(captured, token_ids, hessians=True)
    for group in lae_groups:
        members = [(_node(captured.graph_module, n), plan.layer(n)) for n in group.linears]
        derived = _input_hessian(group, members, stats)
        torch.testing.assert_close(derived, measured_after_fold[group.linears[0]].hessian, rtol=1e-3, atol=1e-4)
    report = gptq_weights(captured.graph_module, plan, stats).report
    lae_nodes = [n for group in lae_groups for n in group.linears]
    assert all(report["output_sqnr_db"][n] >= report["rtn_output_sqnr_db"][n] - 0.01 for n in lae_nodes)


def test_contract_second_run_and_plans_without_gptq_change_nothing(captured, token_ids):
    stats = collect_stats(captured, token_ids, hessians=True)
    plan = _plan(captured, stats, _config())
    gptq_weights(captured.graph_module, plan, stats)
    code = captured.graph_module.code
    again = gptq_weights(captured.graph_module, plan, stats)
    assert not again.modified and again.report["gptq_linears"] == 0 and captured.graph_module.code == code


def test_contract_a_plan_without_gptq_is_left_alone(captured, token_ids):
    stats = collect_stats(captured, token_ids, hessians=True)
    plan = _plan(captured, stats, _config(gptq=False))
    code = captured.graph_module.code
    result = gptq_weights(captured.graph_module, plan, stats)
    assert not result.modified and captured.graph_module.code == code


def test_missing_hessians_and_skipped_gptq_are_refused_before_any_edit(captured, token_ids):
    stats = collect_stats(captured, token_ids)  # no Hessians
    plan = _plan(captured, stats, _config())
    code = captured.graph_module.code
    with pytest.raises(PreconditionError, match=r"no Hessian for .*insert_observers\(hessian_dtype="):
        gptq_weights(captured.graph_module, plan, stats)
    assert captured.graph_module.code == code
    with pytest.raises(PreconditionError, match="planned for GPTQ weights but they were not quantized"):
        insert_w4a8_qdq(captured.graph_module, plan)
    assert captured.graph_module.code == code


def test_report_weight_sqnr_is_the_dequantized_graph_weights_summed_a_chunk_at_a_time(captured, token_ids, monkeypatch):
    import importlib

    from fptq_compile.graph_utils import fetch_tensor

    pass_module = importlib.import_module("fptq_compile.passes.gptq_weights")  # the package exports the function
    stats = collect_stats(captured, token_ids, hessians=True)
    plan = _plan(captured, stats, _config())
    floats = {
        layer.node: fetch_tensor(captured.graph_module, _node(captured.graph_module, layer.node).args[1].target)
        for layer in plan.layers
    }
    monkeypatch.setattr(pass_module, "CHUNK_ELEMENTS", 64 * 5)  # 5 rows of 64 inputs a chunk, the last partial
    report = gptq_weights(captured.graph_module, plan, stats).report
    for layer in plan.layers:
        dequantize = _node(captured.graph_module, layer.node).args[1]
        assert dequantize.target == fptq_ops.dequantize_int4_groups.default
        arguments = [
            fetch_tensor(captured.graph_module, a.target) if isinstance(a, torch.fx.Node) else a
            for a in dequantize.args
        ]
        restored = fptq_ops.dequantize_int4_groups(*arguments)
        assert report["weight_sqnr_db"][layer.node] == pytest.approx(sqnr_db(floats[layer.node], restored), abs=1e-6)
