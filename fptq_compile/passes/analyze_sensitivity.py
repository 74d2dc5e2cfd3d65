"""FPTQ's layer-wise activation policy: decide, per activation group, how to quantize.

Analysis only: reads the graph and the calibration statistics, never edits the graph,
and returns a :class:`~fptq_compile.plan.QuantPlan`.

For the input X of each group of linears (linears that read one tensor share one
decision), with r = max|X| over the calibration data and thresholds v0 < v1:

- r <= v0       -> int8 per-tensor static;
- v0 < r <= v1  -> logarithmic activation equalization (LAE) folded into the norm that
                   produces X, then per-tensor static; without such a norm, or when the
                   norm's output also feeds something else, per-token dynamic instead;
- r > v1        -> int8 per-token dynamic.

Every decision records its statistic and its reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from fptq_compile.capture import LinearSite, module_path_of
from fptq_compile.config import ActivationPolicy, CompileConfig
from fptq_compile.errors import CalibrationError
from fptq_compile.graph_utils import fetch_tensor, find_node
from fptq_compile.passes.insert_observers import ActivationStats
from fptq_compile.plan import (
    ActivationClass,
    ActivationGroup,
    ActivationSpec,
    FoldKind,
    FoldTarget,
    LayerPlan,
    QuantPlan,
    SkippedLayer,
    WeightSpec,
)
from fptq_compile.primitives import equalized_absmax, int8_scale_from_absmax, log_equalization_scale

_MUL = torch.ops.aten.mul.Tensor
_LAYER_NORM = torch.ops.aten.layer_norm.default


def analyze_sensitivity(
    graph_module: fx.GraphModule,
    linears: Sequence[LinearSite],
    skipped: Sequence[SkippedLayer],
    stats: ActivationStats,
    config: CompileConfig,
) -> QuantPlan:
    """The plan for ``linears`` under ``config``'s activation policy."""
    weight = WeightSpec(bits=4, group_size=config.weights.group_size, symmetric=config.weights.symmetric)
    by_input: dict[str, list[LinearSite]] = {}
    for site in linears:
        by_input.setdefault(site.input_node, []).append(site)
    groups = []
    for input_node, members in by_input.items():
        missing = [site.node for site in members if site.node not in stats.per_linear]
        if missing:
            raise CalibrationError(f"no calibration statistics for {', '.join(missing)} ({members[0].module_path})")
        groups.append(_decide(graph_module, input_node, members, stats, config))
    layers = tuple(LayerPlan(site.node, site.module_path, weight, site.input_node) for site in linears)
    return QuantPlan(
        policy=config.activations.policy.value,
        static_threshold=config.activations.static_threshold,
        dynamic_threshold=config.activations.dynamic_threshold,
        layers=layers,
        groups=tuple(groups),
        skipped=tuple(skipped),
    )


def _decide(
    graph_module: fx.GraphModule,
    input_node: str,
    members: Sequence[LinearSite],
    stats: ActivationStats,
    config: CompileConfig,
) -> ActivationGroup:
    channel_absmax = stats[members[0].node].channel_absmax
    absmax = float(channel_absmax.max())
    names = tuple(site.node for site in members)
    policy = config.activations.policy
    v0, v1 = config.activations.static_threshold, config.activations.dynamic_threshold

    def static(reason: str) -> ActivationGroup:
        spec = ActivationSpec(ActivationClass.STATIC, scale=float(int8_scale_from_absmax(absmax)))
        return ActivationGroup(input_node, names, absmax, spec, reason)

    def dynamic(reason: str) -> ActivationGroup:
        return ActivationGroup(input_node, names, absmax, ActivationSpec(ActivationClass.DYNAMIC), reason)

    if policy is ActivationPolicy.WEIGHT_ONLY:
        return ActivationGroup(input_node, names, absmax, ActivationSpec(ActivationClass.FLOAT), "weight-only policy")
    if policy is ActivationPolicy.ALL_STATIC:
        return static("all-static policy")
    if policy is ActivationPolicy.ALL_DYNAMIC:
        return dynamic("all-dynamic policy")
    if absmax <= v0:
        return static(f"max|X| = {absmax:.3g} <= v0 = {v0:g}: per-tensor static")
    if absmax > v1:
        return dynamic(f"max|X| = {absmax:.3g} > v1 = {v1:g}: per-token dynamic")
    if not config.activations.use_lae:
        return dynamic(f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}, LAE disabled by config: per-token dynamic")
    fold, refusal = find_fold_target(graph_module, input_node, names)
    if fold is None:
        return dynamic(f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}, LAE candidate but {refusal}: per-token dynamic")
    lae_scale = log_equalization_scale(channel_absmax)
    equalized = equalized_absmax(channel_absmax, lae_scale)
    spec = ActivationSpec(ActivationClass.LAE_STATIC, scale=float(int8_scale_from_absmax(equalized)))
    reason = (
        f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}: LAE folded into {fold.kind.value} "
        f"{fold.module_path or fold.node} (max|X| after = {equalized:.3g}), then per-tensor static"
    )
    return ActivationGroup(input_node, names, absmax, spec, reason, fold, tuple(float(v) for v in lae_scale.tolist()))


def find_fold_target(
    graph_module: fx.GraphModule, input_node: str, linears: Sequence[str]
) -> tuple[FoldTarget | None, str]:
    """The norm an LAE scale can be folded into exactly, or None and why not.

    Foldable: an RMSNorm's final ``mul(weight, normalized_x)`` or an ``aten.layer_norm``
    with a weight, whose output feeds exactly these linears, with a 1-D parameter weight.
    """
    node = find_node(graph_module, input_node)
    if node is None:
        return None, f"its input {input_node} is not in the graph"
    other_users = sorted(user.name for user in node.users if user.name not in linears)
    if node.op == "call_function" and node.target == _MUL:
        weight_arg = next((arg for arg in node.args if _is_channel_parameter(graph_module, arg, node)), None)
        if weight_arg is None:
            return None, f"its input {node.name} is not a norm (a mul without a per-channel parameter)"
        kind = FoldKind.RMS_NORM
    elif node.op == "call_function" and node.target == _LAYER_NORM:
        weight_arg = node.args[2] if len(node.args) > 2 else None
        if not _is_channel_parameter(graph_module, weight_arg, node):
            return None, f"its layer_norm {node.name} has no weight parameter"
        kind = FoldKind.LAYER_NORM
    else:
        producer = node.target if node.op == "call_function" else node.op
        return None, f"no foldable norm produces it ({producer})"
    if other_users:
        return None, f"the norm output {node.name} also feeds {', '.join(other_users)}"
    return FoldTarget(kind, node.name, module_path_of(node)), ""


def _is_channel_parameter(graph_module: fx.GraphModule, arg: object, consumer: fx.Node) -> bool:
    """A ``get_attr`` of a 1-D tensor as long as ``consumer``'s last dimension."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return False
    tensor = fetch_tensor(graph_module, str(arg.target))
    value = consumer.meta.get("val")
    channels = value.shape[-1] if isinstance(value, torch.Tensor) else None
    return tensor.dim() == 1 and (channels is None or tensor.shape[0] == channels)
