"""``compile``: from a causal LM and calibration data to a W4A8 graph, its plan and a report."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fptq_compile.calibration import CalibrationSource, calibration_token_ids, run_calibration
from fptq_compile.capture import KVCache, KVCacheLayout, capture, logits, select_linears
from fptq_compile.config import CompileConfig
from fptq_compile.errors import ConfigError
from fptq_compile.graph_utils import drop_unused_attributes
from fptq_compile.models import LoadedModel
from fptq_compile.passes.analyze_sensitivity import analyze_sensitivity
from fptq_compile.passes.base import Pass, PassResult, pass_name, run_pass
from fptq_compile.passes.fold_log_equalization import fold_log_equalization
from fptq_compile.passes.insert_observers import insert_observers, read_activation_stats, remove_observers
from fptq_compile.passes.insert_w4a8_qdq import insert_w4a8_qdq
from fptq_compile.plan import QuantPlan

DEFAULT_PASSES: tuple[Pass, ...] = (fold_log_equalization, insert_w4a8_qdq)
"""The transforms FPTQ applies once the plan is made, in order."""


@dataclass(frozen=True)
class CompileReport:
    """What compilation did and what it cost."""

    seconds_per_step: dict[str, float]
    pass_reports: dict[str, dict[str, Any]]
    plan_summary: dict[str, Any]
    calibration_tokens: int
    peak_rss_bytes: int
    linear_weight_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_step": self.seconds_per_step,
            "pass_reports": self.pass_reports,
            "plan_summary": self.plan_summary,
            "calibration_tokens": self.calibration_tokens,
            "peak_rss_bytes": self.peak_rss_bytes,
            "linear_weight_bytes": self.linear_weight_bytes,
        }


@dataclass(frozen=True)
class CompiledModel:
    """The quantized graph (the numerical reference), its plan and the compile report.

    The graph maps ``(input_ids, past) -> (logits, present)``, the cache a list of
    ``(key, value)`` per layer shaped ``[batch, kv_heads, length, head_dim]``.
    """

    graph_module: fx.GraphModule
    plan: QuantPlan
    report: CompileReport
    kv_layout: KVCacheLayout
    config: CompileConfig

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for whole sequences ``input_ids [batch, seq]``."""
        with torch.no_grad():
            return logits(self.graph_module, self.kv_layout, input_ids)

    def step(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One cached step: logits of the new tokens and the cache extended by them."""
        with torch.no_grad():
            output: tuple[torch.Tensor, KVCache] = self.graph_module(input_ids, past_key_values)
            return output


def compile(
    model: nn.Module | LoadedModel,
    calibration: CalibrationSource,
    config: CompileConfig | None = None,
    *,
    passes: Sequence[Pass] = DEFAULT_PASSES,
    tokenizer: Any = None,
    num_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
) -> CompiledModel:
    """Quantize a Hugging Face causal LM to W4A8 with FPTQ.

    ``calibration`` is token ids ``[n, seq]`` or a source from
    :mod:`fptq_compile.calibration` (text needs ``tokenizer``, or a :class:`LoadedModel`);
    ``num_samples`` windows of ``seq_len`` tokens are drawn from text. ``passes`` are the
    transforms run on the graph after planning; pass your own list to add or drop one.
    The user's model is left unchanged.
    """
    config = config or CompileConfig()
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module or LoadedModel, got {type(model).__name__}")
    timings: dict[str, float] = {}
    with _timed(timings, "capture"):
        # Graph of (ids, past cache) -> (logits, present cache), all lengths dynamic.
        captured = capture(model)
    graph_module = captured.graph_module
    # Decoder linears are quantized; lm_head, embeddings and ignored layers stay float.
    linears, skipped = select_linears(captured.linears, config)
    token_ids = calibration_token_ids(
        calibration, tokenizer, num_samples, seq_len, captured.vocab_size, captured.max_sequence_length
    )
    with _timed(timings, "calibration"):
        # Temporary observers measure per-channel max|X| of each linear input, then leave.
        insert_observers(graph_module, linears)
        run_calibration(captured.logits, token_ids, config.calibration_batch_size, progress)
        stats = read_activation_stats(graph_module)
        remove_observers(graph_module)
    with _timed(timings, "analyze_sensitivity"):
        # FPTQ policy per activation group: static / LAE + static / per-token dynamic.
        plan = analyze_sensitivity(graph_module, linears, skipped, stats, config)
    bytes_before = _linear_weight_bytes(graph_module, plan)
    pass_reports: dict[str, dict[str, Any]] = {}
    for transform in passes:
        name = pass_name(transform)
        with _timed(timings, name):
            # Each transform reads the plan; the runner lints and recompiles after it.
            result: PassResult = run_pass(transform, graph_module, plan)
        graph_module = result.graph_module
        pass_reports[name] = {"modified": result.modified, **dict(result.report)}
    drop_unused_attributes(graph_module)
    report = CompileReport(
        seconds_per_step=timings,
        pass_reports=pass_reports,
        plan_summary=plan.summary(),
        calibration_tokens=int(token_ids.numel()),
        peak_rss_bytes=peak_rss_bytes(),
        linear_weight_bytes={"float32": bytes_before, "compiled": _compiled_weight_bytes(graph_module)},
    )
    return CompiledModel(graph_module, plan, report, captured.kv_layout, config)


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 3)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _linear_weight_bytes(graph_module: fx.GraphModule, plan: QuantPlan) -> int:
    """Bytes of the float weights of the planned linears, before quantization."""
    total = 0
    planned = {layer.node for layer in plan.layers}
    for node in graph_module.graph.nodes:
        if node.name in planned and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            weight = graph_module.get_parameter(str(node.args[1].target))
            total += weight.numel() * weight.element_size()
    return total


def _compiled_weight_bytes(graph_module: fx.GraphModule) -> int:
    """Bytes of the int4 weights (two per byte, as exporters pack them) with their scales."""
    total = 0
    for name, buffer in graph_module.named_buffers():
        if name.endswith("_weight_int4"):
            total += (buffer.numel() + 1) // 2
        elif name.endswith(("_weight_scale", "_weight_zero_point")):
            total += buffer.numel() * buffer.element_size()
    return total
