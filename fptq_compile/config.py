"""Compile configuration: frozen dataclasses with typed choices, validated on creation."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class WeightConfig:
    """int4 group-wise weight quantization along the input dimension."""

    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        size = self.group_size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size & (size - 1):
            raise ConfigError(f"weights.group_size must be a positive power of two, got {size!r}")


@dataclass(frozen=True)
class ActivationConfig:
    """int8 activation quantization and the FPTQ thresholds v0 < v1 on max|X|."""

    policy: ActivationPolicy = ActivationPolicy.FPTQ
    static_threshold: float = 15.0
    dynamic_threshold: float = 150.0
    use_lae: bool = True
    """False: LAE candidates (v0 < max|X| <= v1) go per-token dynamic, as when no norm folds."""

    def __post_init__(self) -> None:
        if not isinstance(self.policy, ActivationPolicy):
            allowed = ", ".join(p.value for p in ActivationPolicy)
            raise ConfigError(f"activations.policy must be one of {allowed}, got {self.policy!r}")
        if not 0 < self.static_threshold < self.dynamic_threshold:
            raise ConfigError(
                "activation thresholds must satisfy 0 < v0 < v1, got "
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
    """

    weights: WeightConfig = field(default_factory=WeightConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    ignore: tuple[str, ...] = ()
    calibration_batch_size: int = 4
    error_samples: int = 4
    """Calibration sequences on which the report measures each group's int8 error (0: skip)."""

    def __post_init__(self) -> None:
        for name in ("include", "ignore"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(f"{name} must be a tuple of non-empty pattern strings, got {patterns!r}")
        if not self.include:
            raise ConfigError("include must hold at least one pattern")
        if not isinstance(self.calibration_batch_size, int) or self.calibration_batch_size <= 0:
            raise ConfigError(f"calibration_batch_size must be a positive integer, got {self.calibration_batch_size!r}")
        if not isinstance(self.error_samples, int) or self.error_samples < 0:
            raise ConfigError(f"error_samples must be a non-negative integer, got {self.error_samples!r}")


def config_to_dict(config: CompileConfig) -> dict[str, Any]:
    """The config as plain JSON-ready data (enums by value)."""
    data = dataclasses.asdict(config)
    data["activations"]["policy"] = config.activations.policy.value
    data["include"], data["ignore"] = list(config.include), list(config.ignore)
    return data
