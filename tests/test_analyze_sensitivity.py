from __future__ import annotations

import dataclasses

import pytest
from conftest import collect_stats, lae_everywhere_config

from fptq_compile.capture import select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig
from fptq_compile.errors import ConfigError
from fptq_compile.passes import analyze_sensitivity
from fptq_compile.passes.analyze_sensitivity import find_fold_target
from fptq_compile.plan import ActivationClass, FoldKind, QuantPlan


def _plan(captured, stats, config):
    linears, skipped = select_linears(captured.linears, config)
    return analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)


def test_thresholds_decide_each_group(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    absmax = sorted({s.tensor_absmax for s in stats.per_linear.values()})
    v0, v1 = absmax[1] + 1e-6, absmax[-2] + 1e-6  # some groups in each band
    config = CompileConfig(
        activations=ActivationConfig(policy=ActivationPolicy.FPTQ, static_threshold=v0, dynamic_threshold=v1)
    )
    plan = _plan(captured, stats, config)
    for group in plan.groups:
        if group.activation_absmax <= v0:
            assert group.activation.kind is ActivationClass.STATIC
        elif group.activation_absmax > v1:
            assert group.activation.kind is ActivationClass.DYNAMIC
        else:
            assert group.activation.kind in (ActivationClass.LAE_STATIC, ActivationClass.DYNAMIC)
        assert str(f"{group.activation_absmax:.3g}") in group.reason
    counts = plan.activation_class_counts()
    assert counts["static"] > 0 and counts["dynamic"] > 0


def test_linears_sharing_an_input_share_one_decision_and_scale(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    plan = _plan(captured, stats, lae_everywhere_config(stats))
    by_module = {layer.module_path: layer for layer in plan.layers}
    qkv = {by_module[f"model.layers.0.self_attn.{p}_proj"].input_node for p in "qkv"}
    assert len(qkv) == 1
    group = plan.group_of(by_module["model.layers.0.self_attn.q_proj"])
    assert group.activation.kind is ActivationClass.LAE_STATIC
    assert group.fold is not None and group.fold.kind is FoldKind.RMS_NORM
    assert group.fold.module_path == "model.layers.0.input_layernorm"
    assert len(group.lae_scale) == 64
    # The static scale is the equalized range, far below the raw one (outlier channels).
    assert group.activation.scale < group.activation_absmax / 127.5


def test_lae_folds_everywhere_and_refuses_a_shared_attention_output(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    plan = _plan(captured, stats, lae_everywhere_config(stats))
    # Norms for q/k/v and gate/up, v_proj's rows for o_proj, up_proj's rows for down_proj.
    assert all(plan.group_of(layer).activation.kind is ActivationClass.LAE_STATIC for layer in plan.layers)
    o_proj = next(site for site in captured.linears if site.module_path.endswith("0.self_attn.o_proj"))
    # An attention output read by anything besides the group's linears cannot take the scale.
    fold, reason = find_fold_target(captured.graph_module, o_proj.input_node, linears=())
    assert fold is None and f"also feeds {o_proj.node}" in reason
    # The fold into v_proj is opt-in: without it o_proj's LAE candidates fall back to dynamic.
    config = lae_everywhere_config(stats)
    config = dataclasses.replace(
        config, activations=dataclasses.replace(config.activations, fold_attention_values=False)
    )
    plan = _plan(captured, stats, config)
    group = plan.group_of(plan.layer(o_proj.node))
    assert group.activation.kind is ActivationClass.DYNAMIC
    assert "fold_attention_values" in group.reason


def test_a_norm_that_also_feeds_an_ignored_linear_is_not_folded(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    config = lae_everywhere_config(stats)
    config = CompileConfig(
        weights=config.weights, activations=config.activations, ignore=("model.layers.0.self_attn.v_proj",)
    )
    plan = _plan(captured, stats, config)
    q_proj = next(layer for layer in plan.layers if layer.module_path == "model.layers.0.self_attn.q_proj")
    group = plan.group_of(q_proj)
    assert group.activation.kind is ActivationClass.DYNAMIC
    assert "also feeds" in group.reason
    assert any("v_proj" in s.module_path and "ignore" in s.reason for s in plan.skipped)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (ActivationPolicy.ALL_STATIC, ActivationClass.STATIC),
        (ActivationPolicy.ALL_DYNAMIC, ActivationClass.DYNAMIC),
        (ActivationPolicy.WEIGHT_ONLY, ActivationClass.FLOAT),
    ],
)
def test_uniform_policies(captured, token_ids, policy, expected):
    stats = collect_stats(captured, token_ids)
    plan = _plan(captured, stats, CompileConfig(activations=ActivationConfig(policy=policy)))
    assert {group.activation.kind for group in plan.groups} == {expected}


def test_analysis_never_edits_the_graph_and_the_plan_round_trips(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    code = captured.graph_module.code
    plan = _plan(captured, stats, lae_everywhere_config(stats))
    assert captured.graph_module.code == code
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert [s.module_path for s in plan.skipped] == ["lm_head"]


def test_int8_weight_only_layers_get_8_bit_weights_and_float_activations(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    plan = _plan(
        captured,
        stats,
        CompileConfig(activations=ActivationConfig(policy=ActivationPolicy.ALL_STATIC), int8_weight_only=("lm_head",)),
    )
    head = next(layer for layer in plan.layers if layer.module_path == "lm_head")
    assert (head.weight.bits, head.weight.symmetric) == (8, True)
    assert plan.group_of(head).activation.kind is ActivationClass.FLOAT
    assert "int8_weight_only" in plan.group_of(head).reason
    others = [layer for layer in plan.layers if layer is not head]
    assert len(others) == 14 and all(layer.weight.bits == 4 for layer in others)
    assert all(plan.group_of(layer).activation.kind is ActivationClass.STATIC for layer in others)
    assert not any(skipped.module_path == "lm_head" for skipped in plan.skipped)


@pytest.mark.parametrize(
    ("patterns", "message"),
    [(("lm_heads",), "matches no linear"), (("*.q_proj",), "every linear reading one input")],
)
def test_int8_weight_only_refuses_a_typo_or_a_split_group(captured, token_ids, patterns, message):
    stats = collect_stats(captured, token_ids)
    with pytest.raises(ConfigError, match=message):
        static = ActivationConfig(policy=ActivationPolicy.ALL_STATIC)
        _plan(captured, stats, CompileConfig(activations=static, int8_weight_only=patterns))
