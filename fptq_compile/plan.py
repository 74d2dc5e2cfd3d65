"""The quantization plan: plain, frozen data that says what happens to every linear.

Analysis (:func:`fptq_compile.passes.analyze_sensitivity`) produces a :class:`QuantPlan`;
transform passes read it. It round-trips through JSON, so a run can be reproduced from
its plan and two runs can be diffed.

Linears that read the same input tensor (q/k/v of one attention block, gate/up of one
MLP) form an *activation group*: they share one activation quantization, one statistic
and, under LAE, one equalization scale and one fold target.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from fptq_compile.errors import ConfigError

PLAN_FORMAT_VERSION = 1


class ActivationClass(enum.Enum):
    """What happens to the input activations of a linear."""

    STATIC = "static"
    """int8 per-tensor static, scale from calibration."""
    LAE_STATIC = "lae_static"
    """Logarithmic activation equalization folded upstream, then int8 per-tensor static."""
    DYNAMIC = "dynamic"
    """int8 per-token dynamic, scale computed at run time."""
    FLOAT = "float"
    """Not quantized (weight-only W4A16)."""


class FoldKind(enum.Enum):
    """The upstream op an LAE scale is folded into."""

    RMS_NORM = "rms_norm"
    """``mul(gain, normalized_x)``, the gain the norm weight ``w`` (divided by s) or an offset
    one ``c + w`` such as Gemma's ``1 + w`` (``w`` rewritten so that ``c + w'`` is ``(c + w) / s``)."""
    LAYER_NORM = "layer_norm"
    """``aten.layer_norm(x, shape, weight, bias)``: weight and bias are divided by s."""
    LINEAR_ROWS = "linear_rows"
    """``mul(act(gate(x)), up(x))`` (a gated MLP): the rows of ``up``'s weight and bias are divided by s."""
    ATTENTION_VALUE = "attention_value"
    """``attention(q, k, v(x))`` feeding o_proj: the rows of ``v``'s weight and bias are divided by s, one
    scale per key/value channel, shared by the query heads of its group (grouped-query attention)."""


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    group_size: int
    symmetric: bool
    clip_ratios: tuple[float, ...] = ()
    gptq: bool = False
    """The codes are chosen by GPTQ (the ``gptq_weights`` pass), not rounded to nearest."""


@dataclass(frozen=True)
class ActivationSpec:
    kind: ActivationClass
    bits: int = 8
    scale: float | None = None
    """The per-tensor scale for STATIC and LAE_STATIC (after equalization); else None."""

    def __post_init__(self) -> None:
        is_static = self.kind in (ActivationClass.STATIC, ActivationClass.LAE_STATIC)
        if is_static != (self.scale is not None):
            raise ConfigError(f"activation {self.kind.value} {'needs' if is_static else 'takes no'} scale")


@dataclass(frozen=True)
class FoldTarget:
    """Where an activation group's LAE scale is folded: a norm node, or the linear whose rows
    produce the group's input (``LINEAR_ROWS``; ``node`` is that linear)."""

    kind: FoldKind
    node: str
    module_path: str
    head_dim: int = 0
    """``ATTENTION_VALUE`` only: channels per head."""
    query_heads_per_kv_head: int = 0
    """``ATTENTION_VALUE`` only: how many query heads read each key/value head."""
    gain_offset: float = 0.0
    """``RMS_NORM`` only: the constant added to the norm weight ``w`` to make its gain
    (1.0 for Gemma's ``(1 + w)``); the fold writes ``w'`` with ``offset + w' = (offset + w) / s``."""

    def kv_channel_of(self, channels: int) -> torch.Tensor:
        """``ATTENTION_VALUE``: for each of the ``channels`` attention-output channels
        (``head * head_dim + d``), the value channel it reads (``head // group * head_dim + d``)."""
        channel = torch.arange(channels)
        head, within = channel // self.head_dim, channel % self.head_dim
        return head // self.query_heads_per_kv_head * self.head_dim + within


@dataclass(frozen=True)
class ActivationGroup:
    """Linears reading one input tensor, with the decision they share."""

    input_node: str
    linears: tuple[str, ...]
    activation_absmax: float
    """r = max|X| over the calibration data, the statistic the FPTQ policy decides on."""
    activation: ActivationSpec
    reason: str
    fold: FoldTarget | None = None
    lae_scale: tuple[float, ...] | None = None
    candidate: str | None = None
    """The measured candidate this decision is (a key of ``candidate_sqnr_db``), if measured."""
    candidate_sqnr_db: dict[str, float] | None = None
    """The int8 SQNR (dB) of every candidate measured on calibration data, by name."""

    def __post_init__(self) -> None:
        uses_lae = self.activation.kind is ActivationClass.LAE_STATIC
        if uses_lae and (self.fold is None or self.lae_scale is None):
            raise ConfigError(f"group {self.input_node}: LAE needs a fold target and a scale")
        if not uses_lae and self.lae_scale is not None:
            raise ConfigError(f"group {self.input_node}: a LAE scale without LAE")


@dataclass(frozen=True)
class LayerPlan:
    """One quantized linear: its weight spec and the activation group it belongs to."""

    node: str
    module_path: str
    weight: WeightSpec
    input_node: str


@dataclass(frozen=True)
class SkippedLayer:
    node: str
    module_path: str
    reason: str


@dataclass(frozen=True)
class QuantPlan:
    """Per linear node: weight spec, activation spec, the statistic and the reason."""

    policy: str
    static_threshold: float
    dynamic_threshold: float
    layers: tuple[LayerPlan, ...]
    groups: tuple[ActivationGroup, ...]
    skipped: tuple[SkippedLayer, ...] = ()
    kv_cache_int8: bool = False
    """New keys and values are quantized to int8 per token and head before the cache."""
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        group_inputs = {group.input_node for group in self.groups}
        for layer in self.layers:
            if layer.input_node not in group_inputs:
                raise ConfigError(f"layer {layer.node} ({layer.module_path}) names no known group {layer.input_node}")

    # --- look-ups ---------------------------------------------------------------
    def layer(self, node: str) -> LayerPlan | None:
        return next((layer for layer in self.layers if layer.node == node), None)

    def group_of(self, layer: LayerPlan) -> ActivationGroup:
        return next(group for group in self.groups if group.input_node == layer.input_node)

    def restricted_to(self, linears: Collection[str]) -> QuantPlan:
        """The plan of the linear nodes ``linears`` only: their layers and their groups."""
        layers = tuple(layer for layer in self.layers if layer.node in linears)
        inputs = {layer.input_node for layer in layers}
        groups = tuple(group for group in self.groups if group.input_node in inputs)
        return dataclasses.replace(self, layers=layers, groups=groups, skipped=())

    def activation_class_counts(self) -> dict[str, int]:
        """How many linears (not groups) fall in each activation class."""
        counts: Counter[str] = Counter()
        for group in self.groups:
            counts[group.activation.kind.value] += len(group.linears)
        return {kind.value: counts.get(kind.value, 0) for kind in ActivationClass}

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "quantized_linears": len(self.layers),
            "skipped_linears": len(self.skipped),
            "linears_per_activation_class": self.activation_class_counts(),
            "activation_groups": len(self.groups),
            "kv_cache": "int8" if self.kv_cache_int8 else "float",
        }

    # --- JSON ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "policy": self.policy,
            "static_threshold": self.static_threshold,
            "dynamic_threshold": self.dynamic_threshold,
            "layers": [
                {
                    "node": layer.node,
                    "module_path": layer.module_path,
                    "weight": {**vars(layer.weight), "clip_ratios": list(layer.weight.clip_ratios)},
                    "input_node": layer.input_node,
                }
                for layer in self.layers
            ],
            "groups": [_group_to_dict(group) for group in self.groups],
            "skipped": [vars(skipped).copy() for skipped in self.skipped],
            "kv_cache_int8": self.kv_cache_int8,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ConfigError(f"plan format version {version!r} is not supported (expected {PLAN_FORMAT_VERSION})")
        try:
            return cls(
                policy=data["policy"],
                static_threshold=float(data["static_threshold"]),
                dynamic_threshold=float(data["dynamic_threshold"]),
                layers=tuple(
                    LayerPlan(
                        node=layer["node"],
                        module_path=layer["module_path"],
                        weight=WeightSpec(
                            **{**layer["weight"], "clip_ratios": tuple(layer["weight"].get("clip_ratios", ()))}
                        ),
                        input_node=layer["input_node"],
                    )
                    for layer in data["layers"]
                ),
                groups=tuple(_group_from_dict(group) for group in data["groups"]),
                skipped=tuple(SkippedLayer(**skipped) for skipped in data["skipped"]),
                kv_cache_int8=bool(data.get("kv_cache_int8", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"malformed plan: {error!r}") from error

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        return cls.from_dict(json.loads(text))


def _group_to_dict(group: ActivationGroup) -> dict[str, Any]:
    fold = group.fold
    return {
        "input_node": group.input_node,
        "linears": list(group.linears),
        "activation_absmax": group.activation_absmax,
        "activation": {
            "kind": group.activation.kind.value,
            "bits": group.activation.bits,
            "scale": group.activation.scale,
        },
        "reason": group.reason,
        "fold": None if fold is None else {**vars(fold), "kind": fold.kind.value},
        "lae_scale": None if group.lae_scale is None else list(group.lae_scale),
        "candidate": group.candidate,
        "candidate_sqnr_db": group.candidate_sqnr_db,
    }


def _group_from_dict(data: dict[str, Any]) -> ActivationGroup:
    activation = data["activation"]
    fold = data["fold"]
    return ActivationGroup(
        input_node=data["input_node"],
        linears=tuple(data["linears"]),
        activation_absmax=float(data["activation_absmax"]),
        activation=ActivationSpec(
            kind=ActivationClass(activation["kind"]), bits=int(activation["bits"]), scale=activation["scale"]
        ),
        reason=data["reason"],
        fold=None if fold is None else FoldTarget(**{**fold, "kind": FoldKind(fold["kind"])}),
        lae_scale=None if data["lae_scale"] is None else tuple(float(v) for v in data["lae_scale"]),
        candidate=data.get("candidate"),
        candidate_sqnr_db=data.get("candidate_sqnr_db"),
    )
