from __future__ import annotations

import math

import pytest
import torch
from conftest import collect_stats

from fptq_compile.calibration import run_calibration
from fptq_compile.capture import select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig
from fptq_compile.errors import PreconditionError
from fptq_compile.passes import analyze_sensitivity
from fptq_compile.passes.measure_activation_error import (
    ActivationErrorProbe,
    insert_error_probes,
    read_activation_errors,
    remove_error_probes,
)
from fptq_compile.primitives import int8_scale_from_absmax, quantize_per_token, sqnr_db


def _plan(captured, token_ids, policy=ActivationPolicy.FPTQ):
    stats = collect_stats(captured, token_ids)
    config = CompileConfig(activations=ActivationConfig(policy=policy))
    linears, skipped = select_linears(captured.linears, config)
    return analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)


def test_probes_measure_the_sqnr_of_a_direct_computation(captured, token_ids):
    plan = _plan(captured, token_ids, ActivationPolicy.ALL_STATIC)
    code_before = captured.graph_module.code
    result = insert_error_probes(captured.graph_module, plan)
    assert result.modified and result.report["probes"] == len(plan.groups)
    assert not insert_error_probes(captured.graph_module, plan).modified  # a second run changes nothing
    run_calibration(captured.logits, token_ids, batch_size=4, progress=False)
    errors = read_activation_errors(captured.graph_module)
    assert remove_error_probes(captured.graph_module).modified
    assert captured.graph_module.code == code_before
    assert not any(isinstance(m, ActivationErrorProbe) for m in captured.graph_module.modules())

    # The first group's input is the first layer's input norm: recompute it directly.
    seen = {}
    first = plan.groups[0]
    node = next(n for n in captured.graph_module.graph.nodes if n.name == first.linears[0])
    hook_target = node.args[0]

    def grab(x):
        seen["x"] = x
        return x

    captured.graph_module.register_module("grab", torch.nn.Module())
    captured.graph_module.grab.forward = grab  # type: ignore[method-assign]
    with captured.graph_module.graph.inserting_after(hook_target):
        grabbed = captured.graph_module.graph.call_module("grab", (hook_target,))
    node.replace_input_with(hook_target, grabbed)
    captured.graph_module.recompile()
    captured.logits(token_ids)
    x = seen["x"]
    scale = float(int8_scale_from_absmax(first.activation_absmax))
    static = torch.clamp(torch.round(x / scale), -128, 127) * scale
    codes, token_scale = quantize_per_token(x)
    measured = errors.sqnr_db[first.input_node]
    assert measured["static"] == pytest.approx(sqnr_db(x, static), abs=1e-3)
    assert measured["planned"] == pytest.approx(measured["static"])  # all-static plan
    assert measured["dynamic"] == pytest.approx(sqnr_db(x, codes.float() * token_scale), abs=1e-3)
    # Per-token scales fit each token: never worse than one scale for the whole tensor.
    assert measured["dynamic"] > measured["static"]


def test_weight_only_groups_have_no_planned_error(captured, token_ids):
    plan = _plan(captured, token_ids, ActivationPolicy.WEIGHT_ONLY)
    insert_error_probes(captured.graph_module, plan)
    run_calibration(captured.logits, token_ids, batch_size=4, progress=False)
    errors = read_activation_errors(captured.graph_module)
    remove_error_probes(captured.graph_module)
    for group_errors in errors.sqnr_db.values():
        assert set(group_errors) == {"static", "dynamic"}
        assert all(math.isfinite(value) for value in group_errors.values())


def test_a_plan_from_another_graph_is_refused_before_any_edit(captured, token_ids, llama):
    plan = _plan(captured, token_ids)
    from fptq_compile.capture import capture

    other = capture(llama).graph_module
    last = plan.groups[-1]
    linear = next(n for n in other.graph.nodes if n.name == last.linears[0])
    linear.update_arg(0, linear.args[0].args[0])  # the last group's linear now reads something else
    other.recompile()
    code_before = other.code
    with pytest.raises(PreconditionError, match=last.input_node):
        insert_error_probes(other, plan)
    assert other.code == code_before
