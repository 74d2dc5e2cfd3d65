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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import fx

from fptq_compile.capture import LinearSite, module_path_of
from fptq_compile.config import ActivationPolicy, CompileConfig, WeightRounding
from fptq_compile.errors import CalibrationError, ConfigError
from fptq_compile.graph_utils import channel_gain, fetch_tensor, find_node, transparent_source
from fptq_compile.passes.insert_observers import ActivationStats
from fptq_compile.passes.measure_activation_error import ActivationErrors, Candidate, GroupCandidates
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
_VIEWS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def analyze_sensitivity(
    graph_module: fx.GraphModule,
    linears: Sequence[LinearSite],
    skipped: Sequence[SkippedLayer],
    stats: ActivationStats,
    config: CompileConfig,
    errors: ActivationErrors | None = None,
) -> QuantPlan:
    """The plan for ``linears`` under ``config``'s activation policy.

    ``errors`` are the measured SQNRs of :func:`activation_candidates` (needed by the
    ``error_driven`` policy; with any policy, the plan records them).
    """
    if config.activations.policy is ActivationPolicy.ERROR_DRIVEN and errors is None:
        raise CalibrationError("the error_driven policy needs measured candidate errors")
    weights = config.weights
    gptq = weights.rounding is WeightRounding.GPTQ
    int4 = WeightSpec(4, weights.group_size, weights.symmetric, weights.clip_ratios, gptq)
    int8 = WeightSpec(8, weights.group_size, True)
    groups = []
    for input_node, members in _groups_of(linears).items():
        missing = [site.node for site in members if site.node not in stats.per_linear]
        if missing:
            raise CalibrationError(f"no calibration statistics for {', '.join(missing)} ({members[0].module_path})")
        measured = None if errors is None else errors.sqnr_db.get(input_node)
        if _is_weight_only_group(members, config):
            group = _Group(
                input_node, tuple(site.node for site in members), stats[members[0].node].channel_absmax, None
            )
            groups.append(group.weight_only("int8 weight-only layer (int8_weight_only): activations stay float"))
        else:
            groups.append(_decide(graph_module, input_node, members, stats, config, measured))
    if config.activations.policy is ActivationPolicy.ERROR_DRIVEN:
        groups = _keep_static_share(groups, config)
    layers = tuple(
        LayerPlan(
            site.node, site.module_path, int8 if config.is_int8_weight_only(site.module_path) else int4, site.input_node
        )
        for site in linears
    )
    return QuantPlan(
        policy=config.activations.policy.value,
        static_threshold=config.activations.static_threshold,
        dynamic_threshold=config.activations.dynamic_threshold,
        layers=layers,
        groups=tuple(groups),
        skipped=tuple(skipped),
        kv_cache_int8=config.kv_cache_int8,
    )


STATIC, LAE_STATIC, DYNAMIC = "static", "lae_static", "dynamic"


def _clip_name(ratio: float) -> str:
    return f"static_clip_{ratio:g}"


def _static_ratios(config: CompileConfig) -> dict[str, float]:
    """The static candidates by name, each with its fraction of the calibrated max|X|."""
    return {STATIC: 1.0, **{_clip_name(r): r for r in config.activations.clip_ratios}}


def activation_candidates(
    graph_module: fx.GraphModule, linears: Sequence[LinearSite], stats: ActivationStats, config: CompileConfig
) -> tuple[GroupCandidates, ...]:
    """Per activation group, the ways to quantize its input that a policy can choose from.

    ``static`` (scale from the calibrated max|X|), ``static_clip_<r>`` (that scale times r
    for each of ``clip_ratios``), ``lae_static`` (when a norm folds the LAE scale and LAE is
    enabled) and ``dynamic`` (per token).
    """
    candidates = []
    for input_node, members in _groups_of(linears).items():
        if _is_weight_only_group(members, config):
            continue  # float activations: nothing to choose
        channel_absmax = stats[members[0].node].channel_absmax
        static_scale = float(int8_scale_from_absmax(float(channel_absmax.max())))
        options = {name: Candidate(static_scale * ratio) for name, ratio in _static_ratios(config).items()}
        names = tuple(site.node for site in members)
        fold, _ = _fold_target(graph_module, input_node, names, config)
        if fold is not None and config.activations.use_lae:
            lae_scale = lae_scale_for(channel_absmax, fold)
            scale = float(int8_scale_from_absmax(equalized_absmax(channel_absmax, lae_scale)))
            options[LAE_STATIC] = Candidate(scale, tuple(float(v) for v in lae_scale.tolist()))
        options[DYNAMIC] = Candidate()
        candidates.append(GroupCandidates(input_node, names, options))
    return tuple(candidates)


def _is_weight_only_group(members: Sequence[LinearSite], config: CompileConfig) -> bool:
    """Whether a group's linears are int8 weight-only layers (all of them, or refused)."""
    weight_only = [config.is_int8_weight_only(site.module_path) for site in members]
    if any(weight_only) and not all(weight_only):
        paths = ", ".join(site.module_path for site in members)
        raise ConfigError(
            f"int8_weight_only must name every linear reading one input or none of them: {paths} share theirs"
        )
    return all(weight_only)


def _groups_of(linears: Sequence[LinearSite]) -> dict[str, list[LinearSite]]:
    by_input: dict[str, list[LinearSite]] = {}
    for site in linears:
        by_input.setdefault(site.input_node, []).append(site)
    return by_input


@dataclass(frozen=True)
class _Group:
    """One activation group being decided, and the ways to write the decision down."""

    input_node: str
    linears: tuple[str, ...]
    channel_absmax: torch.Tensor
    measured: Mapping[str, float] | None

    @property
    def absmax(self) -> float:
        return float(self.channel_absmax.max())

    def _group(self, spec: ActivationSpec, reason: str, candidate: str | None, **lae: Any) -> ActivationGroup:
        measured = None if self.measured is None else dict(self.measured)
        return ActivationGroup(
            self.input_node,
            self.linears,
            self.absmax,
            spec,
            reason,
            candidate=candidate,
            candidate_sqnr_db=measured,
            **lae,
        )

    def static(self, reason: str, ratio: float = 1.0) -> ActivationGroup:
        spec = ActivationSpec(ActivationClass.STATIC, scale=float(int8_scale_from_absmax(self.absmax)) * ratio)
        return self._group(spec, reason, STATIC if ratio == 1.0 else _clip_name(ratio))

    def dynamic(self, reason: str) -> ActivationGroup:
        return self._group(ActivationSpec(ActivationClass.DYNAMIC), reason, DYNAMIC)

    def weight_only(self, reason: str) -> ActivationGroup:
        return self._group(ActivationSpec(ActivationClass.FLOAT), reason, None)

    def lae(self, fold: FoldTarget, reason: str) -> ActivationGroup:
        lae_scale = lae_scale_for(self.channel_absmax, fold)
        equalized = equalized_absmax(self.channel_absmax, lae_scale)
        spec = ActivationSpec(ActivationClass.LAE_STATIC, scale=float(int8_scale_from_absmax(equalized)))
        where = fold.module_path or fold.node
        reason += f"; LAE folded into {fold.kind.value} {where} (max|X| after = {equalized:.3g})"
        scale = tuple(float(v) for v in lae_scale.tolist())
        return self._group(spec, reason, LAE_STATIC, fold=fold, lae_scale=scale)


def _decide(
    graph_module: fx.GraphModule,
    input_node: str,
    members: Sequence[LinearSite],
    stats: ActivationStats,
    config: CompileConfig,
    measured: Mapping[str, float] | None,
) -> ActivationGroup:
    group = _Group(input_node, tuple(site.node for site in members), stats[members[0].node].channel_absmax, measured)
    absmax, policy = group.absmax, config.activations.policy
    v0, v1 = config.activations.static_threshold, config.activations.dynamic_threshold
    if policy is ActivationPolicy.WEIGHT_ONLY:
        return group.weight_only("weight-only policy")
    if policy is ActivationPolicy.ALL_STATIC:
        return group.static("all-static policy")
    if policy is ActivationPolicy.ALL_DYNAMIC:
        return group.dynamic("all-dynamic policy")
    if policy is ActivationPolicy.ERROR_DRIVEN:
        return _decide_by_error(graph_module, group, config)
    if absmax <= v0:
        return group.static(f"max|X| = {absmax:.3g} <= v0 = {v0:g}: per-tensor static")
    if absmax > v1:
        return group.dynamic(f"max|X| = {absmax:.3g} > v1 = {v1:g}: per-token dynamic")
    if not config.activations.use_lae:
        return group.dynamic(
            f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}, LAE disabled by config: per-token dynamic"
        )
    fold, refusal = _fold_target(graph_module, input_node, group.linears, config)
    if fold is None:
        reason = f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}, LAE candidate but {refusal}: per-token dynamic"
        return group.dynamic(reason)
    return group.lae(fold, f"{v0:g} < max|X| = {absmax:.3g} <= v1 = {v1:g}: per-tensor static")


def _decide_by_error(graph_module: fx.GraphModule, group: _Group, config: CompileConfig) -> ActivationGroup:
    """The cheapest measured candidate that reaches ``min_sqnr_db``: static (best clipping),
    then LAE + static, else per-token dynamic."""
    measured = group.measured
    if measured is None:
        raise CalibrationError(f"group {group.input_node}: the error_driven policy needs its measured errors")
    target = config.activations.min_sqnr_db
    ratios = _static_ratios(config)
    best_static = max(ratios, key=lambda name: measured[name])
    if measured[best_static] >= target:
        reason = f"{best_static} SQNR {measured[best_static]:.1f} dB >= {target:g} dB: per-tensor static"
        return group.static(reason, ratios[best_static])
    lae_sqnr = measured.get(LAE_STATIC)
    if lae_sqnr is not None and lae_sqnr >= target:
        fold, _ = _fold_target(graph_module, group.input_node, group.linears, config)
        if fold is not None:
            reason = (
                f"LAE + static SQNR {lae_sqnr:.1f} dB >= {target:g} dB (best static {measured[best_static]:.1f} dB)"
            )
            return group.lae(fold, reason)
    reason = f"best static SQNR {measured[best_static]:.1f} dB"
    reason += "" if lae_sqnr is None else f", LAE + static {lae_sqnr:.1f} dB"
    return group.dynamic(f"{reason} < {target:g} dB: per-token dynamic ({measured[DYNAMIC]:.1f} dB)")


def _keep_static_share(groups: list[ActivationGroup], config: CompileConfig) -> list[ActivationGroup]:
    """Move the dynamic groups whose best static candidate measured best back to static until
    at least ``min_fraction`` of the linears are static (static is what int8 hardware runs fast)."""
    min_fraction, ratios = config.activations.min_static_fraction, _static_ratios(config)
    quantized = [group for group in groups if group.activation.kind is not ActivationClass.FLOAT]
    total = sum(len(group.linears) for group in quantized)
    static_kinds = (ActivationClass.STATIC, ActivationClass.LAE_STATIC)
    static = sum(len(group.linears) for group in groups if group.activation.kind in static_kinds)
    dynamic = [index for index, group in enumerate(groups) if group.activation.kind is ActivationClass.DYNAMIC]

    def best_static(group: ActivationGroup) -> tuple[str, float]:
        assert group.candidate_sqnr_db is not None
        measured = group.candidate_sqnr_db
        name = max(ratios, key=measured.__getitem__)
        return name, measured[name]

    result = list(groups)
    for index in sorted(dynamic, key=lambda i: -best_static(groups[i])[1]):
        if static >= min_fraction * total:
            break
        group = groups[index]
        name, sqnr = best_static(group)
        scale = float(int8_scale_from_absmax(group.activation_absmax)) * ratios[name]
        spec = ActivationSpec(ActivationClass.STATIC, scale=scale)
        reason = f"{group.reason}; moved to static ({name}, {sqnr:.1f} dB) to keep {min_fraction:.0%} of linears static"
        result[index] = dataclasses.replace(group, activation=spec, reason=reason, candidate=name)
        static += len(group.linears)
    return result


def lae_scale_for(channel_absmax: torch.Tensor, fold: FoldTarget) -> torch.Tensor:
    """The LAE scale per input channel for a group folding into ``fold``.

    An attention-value fold divides each value channel once for all the query heads that
    read it, so those heads' channels share one scale: the LAE scale of their largest max|X|.
    """
    if fold.kind is not FoldKind.ATTENTION_VALUE:
        return log_equalization_scale(channel_absmax)
    kv_channel = fold.kv_channel_of(channel_absmax.numel())
    pooled = torch.zeros(int(kv_channel.max()) + 1).scatter_reduce(0, kv_channel, channel_absmax.float(), "amax")
    return log_equalization_scale(pooled)[kv_channel]


def _fold_target(
    graph_module: fx.GraphModule, input_node: str, linears: Sequence[str], config: CompileConfig
) -> tuple[FoldTarget | None, str]:
    """:func:`find_fold_target`, less the folds into v_proj unless the config turns them on."""
    fold, refusal = find_fold_target(graph_module, input_node, linears)
    if fold is not None and fold.kind is FoldKind.ATTENTION_VALUE and not config.activations.fold_attention_values:
        return None, "folding into the value projection's rows is off (activations.fold_attention_values)"
    return fold, refusal


def find_fold_target(
    graph_module: fx.GraphModule, input_node: str, linears: Sequence[str]
) -> tuple[FoldTarget | None, str]:
    """Where an LAE scale can be folded exactly, or None and why not.

    Foldable: an RMSNorm's final ``mul(gain, normalized_x)``, the gain a 1-D parameter ``w``
    or an offset one such as Gemma's ``1 + w`` (:func:`~fptq_compile.graph_utils.channel_gain`),
    or an ``aten.layer_norm`` with a weight, whose output feeds exactly these linears, maybe
    through casts and views that keep the channels (:func:`~fptq_compile.graph_utils.transparent_source`);
    or a gated MLP's ``mul(act(gate(x)), up(x))`` feeding exactly these linears, where
    ``up`` is a linear with a parameter weight read by nothing but this mul (its rows take
    the scale: ``act(gate) * up / s``); or an attention output (o_proj's input) whose values
    come from a linear read by nothing else (its rows take the scale, see
    :attr:`FoldKind.ATTENTION_VALUE`).
    """
    node = find_node(graph_module, input_node)
    if node is None:
        return None, f"its input {input_node} is not in the graph"
    other_users = sorted(user.name for user in node.users if user.name not in linears)
    if other_users:
        return None, f"its input {node.name} also feeds {', '.join(other_users)}"
    # Casts and last-dimension-keeping views between the norm and the linears commute with
    # a per-channel scale (Gemma's type_as, GPT-2's flattening view before its addmm).
    source = transparent_source(node)
    if _is_call(source, _MUL):
        gain = next((g for arg in source.args if (g := channel_gain(graph_module, arg, source)) is not None), None)
        up = next((arg for arg in source.args if isinstance(arg, fx.Node) and _is_private_linear(arg, source)), None)
        if gain is not None:
            return FoldTarget(FoldKind.RMS_NORM, source.name, module_path_of(source), gain_offset=gain.offset), ""
        if up is not None and source is node:
            return FoldTarget(FoldKind.LINEAR_ROWS, up.name, module_path_of(up)), ""
        return None, f"its input {source.name} is a mul of neither a per-channel parameter nor a linear's output"
    if _is_call(source, _LAYER_NORM):
        weight_arg = source.args[2] if len(source.args) > 2 else None
        if not _is_channel_parameter(graph_module, weight_arg, source):
            return None, f"its layer_norm {source.name} has no weight parameter"
        return FoldTarget(FoldKind.LAYER_NORM, source.name, module_path_of(source)), ""
    if _is_call(source, *_VIEWS):
        found = _attention_value_source(source)
        if isinstance(found, str):
            return None, found
        value, head_dim, group = found
        return FoldTarget(FoldKind.ATTENTION_VALUE, value.name, module_path_of(value), head_dim, group), ""
    producer = source.target if source.op == "call_function" else source.op
    return None, f"no foldable norm produces it ({producer})"


def _attention_value_source(node: fx.Node) -> tuple[fx.Node, int, int] | str:
    """For ``reshape(transpose(sdpa(q, k, v), 1, 2))``, with ``v`` built as
    ``repeat_kv(cat(past, transpose(view(v_proj(x)), 1, 2)))``: the v_proj linear, the head
    size and the query heads per key/value head; else why not."""
    aten = torch.ops.aten
    transpose = node.args[0]
    while _is_call(transpose, aten.contiguous.default, aten.clone.default):  # Phi-3 copies before merging heads
        transpose = transpose.args[0]
    if not (_is_call(transpose, aten.transpose.int) and set(transpose.args[1:3]) == {1, 2}):
        return f"its input {node.name} is a reshape, but not of an attention output"
    attention = transpose.args[0]
    if not _is_call(attention, aten.scaled_dot_product_attention.default) or len(attention.users) != 1:
        return f"its input {node.name} is a reshape, but not of an attention output"
    heads, head_dim = _shape(attention)[1], _shape(attention)[3]
    value = attention.args[2]
    group: object = 1
    if _is_call(value, *_VIEWS) and _is_call(value.args[0], aten.expand.default):  # repeat_kv
        expand = value.args[0]
        group = _shape(expand)[2]
        value = expand.args[0]
        while _is_call(value, aten.slice.Tensor, aten.unsqueeze.default):
            value = value.args[0]
    if not (_is_call(value, aten.cat.default) and len(value.args) > 1 and value.args[1] in (-2, 2)):
        return "its attention's values are not a key/value cache concatenation"
    parts = value.args[0]
    new = parts[-1] if isinstance(parts, (list, tuple)) else None
    if not (_is_call(new, aten.transpose.int) and set(new.args[1:3]) == {1, 2} and _is_call(new.args[0], *_VIEWS)):
        return "its attention's values are not a projection split into heads"
    split = new.args[0]
    projection = split.args[0]
    if not (isinstance(projection, fx.Node) and _is_private_linear(projection, split)):
        return "its attention's values do not come from a linear read by nothing else"
    kv_heads = _shape(split)[2]
    if not (
        isinstance(heads, int)
        and isinstance(head_dim, int)
        and isinstance(group, int)
        and isinstance(kv_heads, int)
        and heads == kv_heads * group
    ):
        return f"its attention has {heads} heads for {kv_heads} key/value heads repeated {group} times"
    return projection, head_dim, group


def _is_call(node: object, *targets: object) -> TypeGuard[fx.Node]:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node) -> tuple[object, ...]:
    """The node's traced shape, padded with None (unknown) to at least 5 dimensions."""
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    return (*shape, *([None] * (5 - len(shape))))


def _is_private_linear(arg: fx.Node, consumer: fx.Node) -> bool:
    """An ``aten.linear`` with a parameter weight whose only reader is ``consumer``."""
    return (
        arg.op == "call_function"
        and arg.target == torch.ops.aten.linear.default
        and isinstance(arg.args[1], fx.Node)
        and arg.args[1].op == "get_attr"
        and set(arg.users) == {consumer}
    )


def _is_channel_parameter(graph_module: fx.GraphModule, arg: object, consumer: fx.Node) -> bool:
    """A ``get_attr`` of a 1-D tensor as long as ``consumer``'s last dimension."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return False
    tensor = fetch_tensor(graph_module, str(arg.target))
    value = consumer.meta.get("val")
    channels = value.shape[-1] if isinstance(value, torch.Tensor) else None
    return tensor.dim() == 1 and (channels is None or tensor.shape[0] == channels)
