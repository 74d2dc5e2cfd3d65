from __future__ import annotations

import pytest
import torch
from conftest import collect_stats, lae_everywhere_config
from torch import nn

from fptq_compile.capture import select_linears
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig
from fptq_compile.errors import PreconditionError
from fptq_compile.metadata import get_linear_state
from fptq_compile.passes import analyze_sensitivity, fold_log_equalization
from fptq_compile.passes.base import run_pass
from fptq_compile.plan import ActivationClass, FoldKind


def _lae_plan(captured, token_ids, config=None):
    stats = collect_stats(captured, token_ids)
    config = config or lae_everywhere_config(stats)
    linears, skipped = select_linears(captured.linears, config)
    return analyze_sensitivity(captured.graph_module, linears, skipped, stats, config)


def _relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return float((reference - value).abs().max() / reference.abs().max())


def test_folding_is_exact_in_float(llama, captured, token_ids):
    plan = _lae_plan(captured, token_ids)
    # q/k/v and gate/up (into the norms), o_proj (into v_proj's rows) and down_proj (into
    # up_proj's rows) of both layers: every linear.
    assert plan.activation_class_counts()["lae_static"] == 14
    kinds = sorted(group.fold.kind.value for group in plan.groups if group.fold is not None)
    assert kinds == ["attention_value"] * 2 + ["linear_rows"] * 2 + ["rms_norm"] * 4
    with torch.no_grad():
        reference = llama(token_ids).logits
        # Through the runner, which recompiles: the graph module would otherwise run its old code.
        result = run_pass(fold_log_equalization, captured.graph_module, plan)
        folded = captured.logits(token_ids)
        # The key/value cache holds the folded values: decoding from it stays exact too.
        _, cache = captured.graph_module(token_ids[:, :20], captured.kv_layout.empty(token_ids.shape[0]))
        step, _ = captured.graph_module(token_ids[:, 20:21], cache)
    assert result.modified and result.report["folded_groups"] == 8
    assert _relative_error(reference, folded) < 1e-5
    assert _relative_error(reference[:, 20], step[:, -1]) < 1e-5


def test_the_v_proj_rows_take_the_o_proj_scale_shared_by_query_heads(llama, captured, token_ids):
    plan = _lae_plan(captured, token_ids)
    o_proj = next(g for g in plan.groups if g.fold is not None and g.fold.kind is FoldKind.ATTENTION_VALUE)
    assert o_proj.fold.module_path == "model.layers.0.self_attn.v_proj"
    assert (o_proj.fold.head_dim, o_proj.fold.query_heads_per_kv_head) == (16, 2)  # 4 heads, 2 key/value heads
    scale = torch.tensor(o_proj.lae_scale).reshape(4, 16)
    torch.testing.assert_close(scale[0], scale[1])  # heads 0 and 1 read value head 0
    torch.testing.assert_close(scale[2], scale[3])
    assert not torch.equal(scale[0], scale[2])
    fold_log_equalization(captured.graph_module, plan)
    v_node = next(n for n in captured.graph_module.graph.nodes if n.name == o_proj.fold.node)
    v_weight = getattr(captured.graph_module, v_node.args[1].target)
    # v_proj's columns also took the q/k/v group's norm scale: undo it to see the rows alone.
    qkv = next(g for g in plan.groups if o_proj.fold.node in g.linears)
    rows = scale[::2].reshape(-1)
    expected = llama.model.layers[0].self_attn.v_proj.weight / rows[:, None] * torch.tensor(qkv.lae_scale)
    torch.testing.assert_close(v_weight, expected)


def test_the_up_proj_rows_take_the_down_proj_scale(llama, captured, token_ids):
    plan = _lae_plan(captured, token_ids)
    down = next(g for g in plan.groups if g.fold is not None and g.fold.kind is FoldKind.LINEAR_ROWS)
    assert down.fold.module_path == "model.layers.0.mlp.up_proj"
    fold_log_equalization(captured.graph_module, plan)
    up = next(n for n in captured.graph_module.graph.nodes if n.name == down.fold.node)
    up_weight = getattr(captured.graph_module, up.args[1].target)
    # up_proj's columns also took the gate/up group's norm scale: undo it to see the rows alone.
    gate_up = next(g for g in plan.groups if down.fold.node in g.linears)
    columns = torch.tensor(gate_up.lae_scale)
    expected = llama.model.layers[0].mlp.up_proj.weight / torch.tensor(down.lae_scale)[:, None] * columns
    torch.testing.assert_close(up_weight, expected)


def test_folding_rewrites_norm_and_weights_without_touching_the_users_parameters(llama, captured, token_ids):
    before = {name: p.detach().clone() for name, p in llama.named_parameters()}
    plan = _lae_plan(captured, token_ids)
    fold_log_equalization(captured.graph_module, plan)
    for name, parameter in llama.named_parameters():
        assert torch.equal(parameter, before[name]), name  # user model and tied weights untouched
    graph = captured.graph_module.graph
    q_proj = next(n for n in graph.nodes if n.name == plan.layers[0].node)
    assert q_proj.args[1].target == f"fptq_lae_{q_proj.name}_weight"
    assert get_linear_state(q_proj).lae_folded
    group = plan.group_of(plan.layers[0])
    scale = torch.tensor(group.lae_scale)
    original = before["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(getattr(captured.graph_module, q_proj.args[1].target), original * scale)
    norm = next(n for n in graph.nodes if n.name == group.fold.node)
    norm_weight = next(a for a in norm.args if getattr(a, "op", None) == "get_attr")
    torch.testing.assert_close(
        getattr(captured.graph_module, norm_weight.target), before["model.layers.0.input_layernorm.weight"] / scale
    )


def test_second_run_and_plans_without_lae_change_nothing(captured, token_ids):
    plan = _lae_plan(captured, token_ids)
    assert fold_log_equalization(captured.graph_module, plan).modified
    code = captured.graph_module.code
    assert not fold_log_equalization(captured.graph_module, plan).modified
    assert captured.graph_module.code == code


def test_a_plan_without_lae_leaves_the_graph_unchanged(captured, token_ids):
    stats = collect_stats(captured, token_ids)
    absmax = max(s.tensor_absmax for s in stats.per_linear.values())
    config = CompileConfig(
        activations=ActivationConfig(
            policy=ActivationPolicy.FPTQ, static_threshold=absmax + 1, dynamic_threshold=absmax + 2
        )
    )
    plan = _lae_plan(captured, token_ids, config)
    assert plan.activation_class_counts()["lae_static"] == 0
    code = captured.graph_module.code
    assert not fold_log_equalization(captured.graph_module, plan).modified
    assert captured.graph_module.code == code


def test_a_graph_that_changed_since_analysis_is_refused(captured, token_ids):
    plan = _lae_plan(captured, token_ids)
    group = next(g for g in plan.groups if g.activation.kind is ActivationClass.LAE_STATIC)
    norm = next(n for n in captured.graph_module.graph.nodes if n.name == group.fold.node)
    with captured.graph_module.graph.inserting_after(norm):
        extra = captured.graph_module.graph.call_function(torch.ops.aten.relu.default, (norm,))
    extra.meta["val"] = norm.meta.get("val")
    with pytest.raises(PreconditionError, match="must feed exactly"):
        fold_log_equalization(captured.graph_module, plan)


class _LayerNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"norm": nn.LayerNorm(48), "a": nn.Linear(48, 32), "b": nn.Linear(48, 16)})]
        )
        with torch.no_grad():
            self.layers[0]["norm"].weight.uniform_(0.5, 2.0)
            self.layers[0]["norm"].bias.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.layers[0]
        h = block["norm"](x)
        return torch.cat([block["a"](h), block["b"](h)], dim=-1)


def test_layer_norm_weight_and_bias_are_folded_exactly():
    from fptq_compile.capture import CapturedModel, KVCacheLayout, find_linear_sites

    torch.manual_seed(0)
    module = _LayerNormBlock().eval()
    x = torch.randn(4, 10, 48) * torch.linspace(0.1, 40, 48)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    graph_module = exported.module()
    captured = CapturedModel(graph_module, find_linear_sites(graph_module), KVCacheLayout(0, 1, 1), None, None)
    stats = collect_stats(captured, x, forward=graph_module)
    config = lae_everywhere_config(stats)
    linears, skipped = select_linears(captured.linears, config)
    plan = analyze_sensitivity(graph_module, linears, skipped, stats, config)
    (group,) = plan.groups
    assert group.fold is not None and group.fold.kind is FoldKind.LAYER_NORM
    with torch.no_grad():
        reference = module(x)
        assert run_pass(fold_log_equalization, graph_module, plan).modified
        assert _relative_error(reference, graph_module(x)) < 1e-5
