"""fptq_compile: a W4A8 (int4 weights, int8 activations) FPTQ quantization compiler.

Typical use::

    import fptq_compile as fptq
    loaded = fptq.load_model()                      # built-in SmolLM2-135M, offline
    compiled = fptq.compile(loaded, fptq.RandomTokens(), num_samples=8, seq_len=128)
    logits = compiled(input_ids)
    print(compiled.plan.summary())
"""

from __future__ import annotations

from fptq_compile import ops as ops  # registers torch.ops.fptq.*
from fptq_compile import passes as passes
from fptq_compile.calibration import HFDataset, RandomTokens, TextFile, Texts
from fptq_compile.config import (
    ActivationConfig,
    ActivationPolicy,
    CalibrationDtype,
    CompileConfig,
    GPTQConfig,
    WeightConfig,
    WeightRounding,
)
from fptq_compile.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    FptqError,
    ModelLoadError,
    PassError,
    PreconditionError,
    UnsupportedGraphError,
)
from fptq_compile.generation import generate_ids, generate_text
from fptq_compile.models import LoadedModel, load_model
from fptq_compile.passes.base import Pass, PassResult
from fptq_compile.pipeline import DEFAULT_PASSES, Analysis, CompiledModel, CompileReport, analyze, compile
from fptq_compile.plan import ActivationClass, QuantPlan
from fptq_compile.saving import load_compiled, save_compiled

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PASSES",
    "ActivationClass",
    "ActivationConfig",
    "ActivationPolicy",
    "Analysis",
    "CalibrationDtype",
    "CalibrationError",
    "CompileConfig",
    "CompileReport",
    "CompiledModel",
    "ConfigError",
    "ExportError",
    "FptqError",
    "GPTQConfig",
    "HFDataset",
    "LoadedModel",
    "ModelLoadError",
    "Pass",
    "PassError",
    "PassResult",
    "PreconditionError",
    "QuantPlan",
    "RandomTokens",
    "TextFile",
    "Texts",
    "UnsupportedGraphError",
    "WeightConfig",
    "WeightRounding",
    "analyze",
    "compile",
    "generate_ids",
    "generate_text",
    "load_compiled",
    "load_model",
    "save_compiled",
]
