from __future__ import annotations

import pytest
import torch
from conftest import collect_stats

from fptq_compile.calibration import run_calibration
from fptq_compile.capture import capture, select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig
from fptq_compile.errors import PreconditionError
from fptq_compile.passes import analyze_sensitivity
from fptq_compile.passes.analyze_sensitivity import activation_candidates
from fptq_compile.passes.measure_activation_error import (
    ActivationErrorProbe,
    insert_error_probes,
    read_activation_errors,
    remove_error_probes,
)
from fptq_compile.primitives import int8_scale_from_absmax, quantize_per_token, sqnr_db


def _candidates(captured, token_ids, **activations):
    stats = collect_stats(captured, token_ids)
    config = CompileConfig(activations=ActivationConfig(**activations))
    linears, skipped = select_linears(captured.linears, config)
    return stats, config, linears, skipped, activation_candidates(captured.graph_module, linears, stats, config)


def _measure(graph_module, forward, groups, token_ids):
    insert_error_probes(graph_module, groups)
    run_calibration(forward, token_ids, batch_size=4, progress=False)
    errors = read_activation_errors(graph_module)
    remove_error_probes(graph_module)
    return errors


def _input_of_first_group(captured, group, token_ids):
    """The tensor the first group's linears read, captured with a forward hook on its input."""
    seen = {}
    linear = next(n for n in captured.graph_module.graph.nodes if n.name == group.linears[0])
    source = linear.args[0]

    class Grab(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x

    captured.graph_module.add_submodule("grab", Grab())
    with captured.graph_module.graph.inserting_after(source):
        grabbed = captured.graph_module.graph.call_module("grab", (source,))
    linear.replace_input_with(source, grabbed)
    captured.graph_module.recompile()
    captured.logits(token_ids)
    return seen["x"]


def test_probes_measure_the_sqnr_of_a_direct_computation(llama, token_ids):
    captured = capture(llama)
    *_, groups = _candidates(captured, token_ids)
    code_before = captured.graph_module.code
    result = insert_error_probes(captured.graph_module, groups)
    assert result.modified and result.report["probes"] == len(groups)
    assert not insert_error_probes(captured.graph_module, groups).modified  # a second run changes nothing
    run_calibration(captured.logits, token_ids, batch_size=4, progress=False)
    errors = read_activation_errors(captured.graph_module)
    assert remove_error_probes(captured.graph_module).modified
    assert captured.graph_module.code == code_before
    assert not any(isinstance(m, ActivationErrorProbe) for m in captured.graph_module.modules())

    first = groups[0]
    x = _input_of_first_group(captured, first, token_ids)
    measured = errors.sqnr_db[first.input_node]
    assert set(measured) == set(first.candidates)
    scale = float(int8_scale_from_absmax(x.abs().max()))
    assert first.candidates["static"].scale == pytest.approx(scale)
    static = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert measured["static"] == pytest.approx(sqnr_db(x, static), abs=1e-3)
    clipped = 0.7 * scale
    assert measured["static_clip_0.7"] == pytest.approx(
        sqnr_db(x, torch.clamp(torch.round(x / clipped), -128, 127) * clipped), abs=1e-3
    )
    codes, token_scale = quantize_per_token(x)
    assert measured["dynamic"] == pytest.approx(sqnr_db(x, codes.float() * token_scale), abs=1e-3)
    lae = first.candidates["lae_static"]  # the first group reads an RMSNorm: LAE folds
    lae_scale = torch.tensor(lae.lae_scale)
    restored = torch.clamp(torch.round(x / lae_scale / lae.scale), -128, 127) * lae.scale * lae_scale
    assert measured["lae_static"] == pytest.approx(sqnr_db(x, restored), abs=1e-3)
    # Per-token scales fit each token: never worse than one scale for the whole tensor.
    assert measured["dynamic"] > measured["static"]


def test_groups_that_do_not_match_the_graph_are_refused_before_any_edit(llama, token_ids):
    captured = capture(llama)
    *_, groups = _candidates(captured, token_ids)
    other = capture(llama).graph_module
    last = groups[-1]
    linear = next(n for n in other.graph.nodes if n.name == last.linears[0])
    linear.update_arg(0, linear.args[0].args[0])  # the last group's linear now reads something else
    other.recompile()
    code_before = other.code
    with pytest.raises(PreconditionError, match=last.input_node):
        insert_error_probes(other, groups)
    assert other.code == code_before


def test_error_driven_policy_picks_the_cheapest_candidate_that_meets_the_target(llama, token_ids):
    captured = capture(llama)
    stats, _, linears, skipped, groups = _candidates(captured, token_ids)
    errors = _measure(captured.graph_module, captured.logits, groups, token_ids)
    all_sqnr = [value for group in errors.sqnr_db.values() for value in group.values()]
    for target, min_static in ((min(all_sqnr) - 1, 0.0), (max(all_sqnr) + 1, 0.0), (max(all_sqnr) + 1, 0.5)):
        config = CompileConfig(
            activations=ActivationConfig(
                policy=ActivationPolicy.ERROR_DRIVEN, min_sqnr_db=target, min_static_fraction=min_static
            )
        )
        plan = analyze_sensitivity(captured.graph_module, linears, skipped, stats, config, errors)
        counts = plan.activation_class_counts()
        for group in plan.groups:
            assert group.candidate_sqnr_db == errors.sqnr_db[group.input_node]
            assert group.candidate in group.candidate_sqnr_db
        if target < min(all_sqnr):  # every static candidate meets it: all static, at their best clipping
            assert counts["static"] == len(linears)
            for group in plan.groups:
                statics = {k: v for k, v in group.candidate_sqnr_db.items() if k.startswith("static")}
                assert group.candidate == max(statics, key=statics.get)
        elif min_static == 0.0:  # nothing meets it: all dynamic
            assert counts["dynamic"] == len(linears)
        else:  # the static share is kept by the groups whose static error is smallest
            static = counts["static"] + counts["lae_static"]
            assert static >= 0.5 * len(linears) and counts["dynamic"] > 0
            moved = [g for g in plan.groups if g.activation.kind.value == "static"]
            kept = [g for g in plan.groups if g.activation.kind.value == "dynamic"]
            best = lambda g: max(v for k, v in g.candidate_sqnr_db.items() if k.startswith("static"))  # noqa: E731
            assert min(map(best, moved)) >= max(map(best, kept))
