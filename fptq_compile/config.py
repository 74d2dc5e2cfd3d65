"""Compile configuration: frozen dataclasses with typed choices, validated on creation."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fptq_compile.errors import ConfigError

# A linear is "inside a decoder layer" when its module path has a numeric component
# (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``): repeated blocks
# live in a ModuleList. ``lm_head`` and embeddings have none, so they stay float.
DEFAULT_INCLUDE: tuple[str, ...] = ("*.[0-9]*",)


class ActivationPolicy(enum.Enum):
    """How the activation quantization of each linear is chosen."""

    FPTQ = "fptq"
    """The paper's layer-wise policy: static below v0, LAE + static up to v1, dynamic above."""
    ALL_STATIC = "all_static"
    """Every activation int8 per-tensor static (the naive W4A8 baseline)."""
    ALL_DYNAMIC = "all_dynamic"
    """Every activation int8 per-token dynamic."""
    WEIGHT_ONLY = "weight_only"
    """Activations stay float (W4A16)."""
    ERROR_DRIVEN = "error_driven"
    """Per group, the cheapest candidate whose int8 error measured on calibration data meets
    ``min_sqnr_db`` (static, clipped static, LAE + static, then per-token dynamic), keeping at
    least ``min_static_fraction`` of the linears static."""


class WeightRounding(enum.Enum):
    """How int4 codes are chosen on the group grid (the scales are the same either way)."""

    GPTQ = "gptq"
    """GPTQ: column by column, the rounding error spread over the columns not yet quantized,
    weighted by the calibration inputs' Hessian (minimizes the layer's output error)."""
    NEAREST = "nearest"
    """Round to nearest (RTN): no Hessians, faster compile."""


class CalibrationDtype(enum.Enum):
    """The precision of the graph's matrix products while calibrating and measuring errors."""

    FLOAT32 = "float32"
    """Everything in float32, as the model was captured (DESIGN.md's protocol)."""
    BFLOAT16 = "bfloat16"
    """Linears, matmuls and attention in bfloat16 under ``torch.autocast``, everything else
    (norms, residual sums, activations) in float32. The observers and error probes read what
    each linear reads in that run: float32, except attention's output (``o_proj``'s input),
    which is bfloat16. Faster where bfloat16 matmuls are (AVX512-BF16 or AMX CPUs, GPUs),
    slower on a CPU without bfloat16 units. The statistics move with the activations, so a
    group near a threshold may be planned otherwise than in float32."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ rounding of the int4 weights (see :mod:`fptq_compile.gptq`)."""

    damp: float = 0.01
    """Added to each Hessian's diagonal, as a fraction of its mean diagonal."""
    act_order: bool = True
    """Quantize input columns by decreasing Hessian diagonal (groups stay contiguous)."""
    block_size: int = 128
    """Columns between GPTQ's lazy batch updates (speed only)."""
    hessian_dtype: CalibrationDtype = CalibrationDtype.BFLOAT16
    """The dtype each linear's calibration inputs are rounded to before their Hessian
    ``X^T X`` is summed in float32. ``bfloat16`` (default): the Hessian GPTQ gets when the
    model runs in bfloat16, as GPTQ is usually run on GPUs; where the CPU has bfloat16 units
    (AVX-512 BF16, AMX) the products run as bfloat16, 2.4x faster. ``float32``: the inputs
    as they are."""

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, float) and 0 < self.damp < 1):
            raise ConfigError(f"weights.gptq.damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ConfigError(f"weights.gptq.block_size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class WeightConfig:
    """int4 group-wise weight quantization along the input dimension."""

    group_size: int = 128
    symmetric: bool = False
    """False (default): asymmetric groups with an int4 zero point; True: ``absmax / 7.5``."""
    clip_ratios: tuple[float, ...] = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    """Also try each group's range shrunk to these fractions and keep the one with the
    smallest weight error (MSE-searched clipping; ``()``: the full range only). On SmolLM2 at
    g128 with GPTQ it measured 34.40 PPL against 35.10 unclipped."""
    rounding: WeightRounding = WeightRounding.GPTQ
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    """GPTQ's settings (used with ``rounding = gptq``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rounding, WeightRounding):
            allowed = ", ".join(r.value for r in WeightRounding)
            raise ConfigError(f"weights.rounding must be one of {allowed}, got {self.rounding!r}")
        if not all(isinstance(r, float) and 0 < r < 1 for r in self.clip_ratios):
            raise ConfigError(f"weights.clip_ratios must be numbers in (0, 1), got {self.clip_ratios!r}")
        size = self.group_size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size & (size - 1):
            raise ConfigError(f"weights.group_size must be a positive power of two, got {size!r}")


@dataclass(frozen=True)
class ActivationConfig:
    """int8 activation quantization and the FPTQ thresholds v0 < v1 on max|X|."""

    policy: ActivationPolicy = ActivationPolicy.ERROR_DRIVEN
    static_threshold: float = 15.0
    dynamic_threshold: float = 150.0
    use_lae: bool = True
    """False: LAE candidates (v0 < max|X| <= v1) go per-token dynamic, as when no norm folds."""
    fold_attention_values: bool = False
    """True: o_proj's inputs also get LAE candidates, folded into v_proj's rows. Off by default:
    the paper folds LAE into norms only, and on SmolLM2 the error-driven policy then put five
    more o_proj groups on LAE + static and lost 0.2 PPL (40.27 -> 40.47)."""
    clip_ratios: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)
    """Static candidates besides the calibrated max|X|: scales clipped to these fractions of it."""
    min_sqnr_db: float = 30.0
    """error_driven: the activation SQNR a static candidate must reach to be chosen."""
    min_static_fraction: float = 0.5
    """error_driven: the share of quantized linears kept on static activations, at least."""

    def __post_init__(self) -> None:
        if not isinstance(self.policy, ActivationPolicy):
            allowed = ", ".join(p.value for p in ActivationPolicy)
            raise ConfigError(f"activations.policy must be one of {allowed}, got {self.policy!r}")
        if not all(isinstance(r, float) and 0 < r < 1 for r in self.clip_ratios):
            raise ConfigError(f"activations.clip_ratios must be numbers in (0, 1), got {self.clip_ratios!r}")
        if not 0 <= self.min_static_fraction <= 1:
            raise ConfigError(f"activations.min_static_fraction must lie in [0, 1], got {self.min_static_fraction!r}")
        if not 0 < self.static_threshold < self.dynamic_threshold:
            raise ConfigError(
                "activations.static_threshold (v0) and dynamic_threshold (v1) must satisfy 0 < v0 < v1, got "
                f"v0={self.static_threshold!r}, v1={self.dynamic_threshold!r}"
            )


@dataclass(frozen=True)
class CompileConfig:
    """Everything :func:`fptq_compile.compile` needs besides the model and the data.

    ``include`` and ``ignore`` are shell-style patterns (``fnmatch``) on module paths as
    ``model.named_modules()`` names them. A linear is quantized when it matches an
    ``include`` pattern and no ``ignore`` pattern; every other linear is listed in the
    plan as skipped, with the reason. An ``ignore`` pattern that matches no linear is an
    error (it is almost always a typo).

    ``int8_weight_only`` patterns name linears (e.g. ``lm_head``) quantized to symmetric
    int8 weights in groups of ``weights.group_size`` with float activations (W8A16), whether
    or not ``include`` matches them: for layers where int4 costs too much accuracy but
    float weights cost too much memory traffic.
    """

    weights: WeightConfig = field(default_factory=WeightConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    ignore: tuple[str, ...] = ()
    int8_weight_only: tuple[str, ...] = ()
    kv_cache_int8: bool = False
    """Keys and values enter the cache as int8 per token and head (symmetric, dynamic scale
    ``absmax / 127.5`` over ``head_dim``), as an int8 KV cache stores them."""
    calibration_batch_size: int = 4
    error_samples: int = 4
    """Calibration sequences on which the report measures each group's int8 error (0: skip)."""
    calibration_dtype: CalibrationDtype = CalibrationDtype.FLOAT32
    """The precision calibration and the error measurement run the graph in."""
    calibrate_by_block: bool = False
    """Calibrate a causal LM's decoder blocks one after another (one block's activations in
    flight), with one captured block graph rebound to each block: the same statistics, errors
    and plan as whole-model calibration. Groundwork for compiling models bigger than memory;
    the model is still loaded and captured whole."""

    def __post_init__(self) -> None:
        for name in ("include", "ignore", "int8_weight_only"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{name} must be a tuple of non-empty pattern strings, got {patterns!r}")
        if not self.include:
            raise ConfigError("include must hold at least one pattern")
        if not isinstance(self.calibration_batch_size, int) or self.calibration_batch_size <= 0:
            raise ConfigError(f"calibration_batch_size must be a positive integer, got {self.calibration_batch_size!r}")
        if not isinstance(self.error_samples, int) or self.error_samples < 0:
            raise ConfigError(f"error_samples must be a non-negative integer, got {self.error_samples!r}")
        if self.activations.policy is ActivationPolicy.ERROR_DRIVEN and self.error_samples == 0:
            raise ConfigError("activations.policy error_driven measures errors: error_samples must be at least 1")

    def is_int8_weight_only(self, module_path: str) -> bool:
        """Whether ``module_path`` matches an ``int8_weight_only`` pattern."""
        return any(fnmatch.fnmatchcase(module_path, pattern) for pattern in self.int8_weight_only)


def config_to_dict(config: CompileConfig) -> dict[str, Any]:
    """The config as plain JSON-ready data (enums by value)."""
    data = dataclasses.asdict(config)
    data["activations"]["policy"] = config.activations.policy.value
    data["activations"]["clip_ratios"] = list(config.activations.clip_ratios)
    data["weights"]["clip_ratios"] = list(config.weights.clip_ratios)
    data["weights"]["rounding"] = config.weights.rounding.value
    data["weights"]["gptq"]["hessian_dtype"] = config.weights.gptq.hessian_dtype.value
    data["calibration_dtype"] = config.calibration_dtype.value
    data["include"], data["ignore"] = list(config.include), list(config.ignore)
    data["int8_weight_only"] = list(config.int8_weight_only)
    return data


def config_from_dict(data: Mapping[str, Any]) -> CompileConfig:
    """A :class:`CompileConfig` from plain data (a config file, a saved ``compile_config.json``).

    Every key is checked: an unknown key, a value of the wrong type or an enum value out
    of range raises :class:`ConfigError` naming the key and what it allows.
    """
    return dataclass_from_dict(CompileConfig, data)


DataclassT = TypeVar("DataclassT")


def dataclass_from_dict(cls: type[DataclassT], data: Mapping[str, Any], prefix: str = "") -> DataclassT:
    """Build the frozen dataclass ``cls`` from nested plain data, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}{key!s}; allowed: {', '.join(prefix + name for name in fields)}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as error:  # a missing required field
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def _convert(annotation: Any, value: Any, key: str) -> Any:
    """``value`` checked against the field type ``annotation`` (and converted where lossless)."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
        return _convert(annotation, value, key)
    if dataclasses.is_dataclass(annotation):
        return dataclass_from_dict(annotation, value, f"{key}.")  # type: ignore[arg-type]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        allowed = [member.value for member in annotation]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return annotation(value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_convert(arguments[0], item, f"{key}[{index}]") for index, item in enumerate(value))
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation)
    if expected is None:
        raise ConfigError(f"{key}: unsupported field type {annotation!r}")
    valid = isinstance(value, annotation) and not (annotation is not bool and isinstance(value, bool))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not valid:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    return value
