"""``compile``: from a causal LM and calibration data to a W4A8 graph, its plan and a report."""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fptq_compile.calibration import CalibrationSource, RandomTokens, calibration_token_ids, input_batches, run_batches
from fptq_compile.capture import (
    CapturedModel,
    GraphSignature,
    KVCache,
    KVCacheLayout,
    LinearSite,
    cache_signature,
    capture,
    capture_graph,
    graph_attribute,
    logits,
    model_limits,
    select_linears,
)
from fptq_compile.collector import fewer_collections
from fptq_compile.config import CompileConfig, WeightRounding
from fptq_compile.errors import ConfigError, ExportError, UnsupportedGraphError
from fptq_compile.graph_utils import (
    attribute_targets,
    drop_unused_attributes,
    fetch_tensor,
    probes_only,
    replace_tensor,
)
from fptq_compile.kernels import with_calibration_kernels
from fptq_compile.lift import NotLiftable, lift_graph
from fptq_compile.models import LoadedModel
from fptq_compile.offload import TensorStore, capture_offloaded, placed_off_the_cpu, return_freed_memory_at_once
from fptq_compile.passes.analyze_sensitivity import activation_candidates, analyze_sensitivity
from fptq_compile.passes.base import Pass, PassResult, pass_name, run_pass
from fptq_compile.passes.fold_log_equalization import fold_log_equalization
from fptq_compile.passes.gptq_weights import gptq_weights
from fptq_compile.passes.insert_observers import (
    ActivationObserver,
    ActivationStats,
    insert_observers,
    read_activation_stats,
    remove_observers,
)
from fptq_compile.passes.insert_w4a8_qdq import insert_w4a8_qdq
from fptq_compile.passes.measure_activation_error import (
    ActivationErrorProbe,
    insert_error_probes,
    read_activation_errors,
    remove_error_probes,
)
from fptq_compile.passes.quantize_kv_cache import quantize_kv_cache
from fptq_compile.plan import QuantPlan
from fptq_compile.progress import StepProgress
from fptq_compile.sequential import blocks_in_turn, calibrate_by_block

DEFAULT_PASSES: tuple[Pass, ...] = (fold_log_equalization, insert_w4a8_qdq, quantize_kv_cache)
"""The transforms FPTQ applies once the plan is made, in order (GPTQ is added before
``insert_w4a8_qdq`` when the weights use it; ``quantize_kv_cache`` acts when planned)."""


@dataclass(frozen=True)
class CompileReport:
    """What compilation did and what it cost."""

    seconds_per_step: dict[str, float]
    pass_reports: dict[str, dict[str, Any]]
    plan_summary: dict[str, Any]
    calibration_tokens: int | None
    peak_rss_bytes: int
    linear_weight_bytes: dict[str, int] = field(default_factory=dict)
    capture_route: str = ""
    """How the graph was captured (:attr:`~fptq_compile.capture.CapturedModel.route`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompileReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class CompiledModel:
    """The quantized graph (the numerical reference), its plan and the compile report.

    For a causal LM (``kv_layout`` set) the graph maps ``(input_ids, past) -> (logits,
    present)``, the cache a list of ``(key, value)`` per layer shaped ``[batch, kv_heads,
    length, head_dim]``. Any other graph keeps the inputs and outputs it was captured with
    (``signature``).
    """

    graph_module: fx.GraphModule
    plan: QuantPlan
    report: CompileReport
    kv_layout: KVCacheLayout | None
    config: CompileConfig
    signature: GraphSignature | None = None
    """Example inputs and dynamic shapes, for re-exporting the graph (saving, ONNX)."""
    offloaded: TensorStore | None = None
    """Where the decoder blocks' tensors are, for a model compiled offloaded (the graph holds
    ``meta`` tensors in their place); None when every tensor is in the graph."""

    def __call__(self, *inputs: Any, **keyword_inputs: Any) -> Any:
        """A causal LM: logits ``[batch, seq, vocab]`` for whole sequences ``input_ids [batch, seq]``.
        Any other graph: its outputs for its inputs."""
        self._check_in_memory()
        with torch.no_grad():
            if self.kv_layout is None:
                return self.graph_module(*inputs, **keyword_inputs)
            (input_ids,) = inputs
            return logits(self.graph_module, self.kv_layout, input_ids)

    def example_signature(self) -> GraphSignature:
        """Example inputs and dynamic shapes to re-export the graph with (saving, ONNX)."""
        if self.kv_layout is not None:
            example_inputs, dynamic_shapes = cache_signature(self.kv_layout)
            return GraphSignature(example_inputs, {}, dynamic_shapes)
        if self.signature is None:
            raise UnsupportedGraphError("this compiled graph records neither a key/value cache nor example inputs")
        return self.signature

    def exported_program(self) -> torch.export.ExportedProgram:
        """The graph as a ``torch.export`` program (for saving and for ONNX; one program
        serves both), lifted without a trace (:func:`~fptq_compile.lift.lift_graph`), or
        re-exported where it cannot be. It shares the graph module's tensors: nothing is copied."""
        self._check_in_memory()
        signature = self.example_signature()
        try:
            return lift_graph(self.graph_module, signature)
        except NotLiftable as reason:
            warnings.warn(
                f"re-exporting the compiled graph (slower): it cannot be lifted as it is ({reason})", stacklevel=2
            )
        return export_graph(self.graph_module, signature)

    def step(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One cached step (a causal LM): logits of the new tokens and the cache extended by them."""
        self._check_in_memory()
        if self.kv_layout is None:
            raise UnsupportedGraphError("this compiled graph is not a causal LM with a key/value cache")
        with torch.no_grad():
            output: tuple[torch.Tensor, KVCache] = self.graph_module(input_ids, past_key_values)
            return output

    def in_memory(self) -> CompiledModel:
        """This model with every offloaded tensor read back into its graph (for a model that
        fits in memory: to run it in torch); the model itself when nothing is offloaded."""
        if self.offloaded is None:
            return self
        self.offloaded.materialize(self.graph_module)
        return dataclasses.replace(self, offloaded=None)

    @property
    def on_disk(self) -> bool:
        """Whether the decoder blocks' tensors are in the offload folder, not in the graph."""
        return self.offloaded is not None and bool(self.offloaded.files)

    def _check_in_memory(self) -> None:
        if self.on_disk:
            assert self.offloaded is not None  # on_disk says so
            raise UnsupportedGraphError(
                f"the compiled blocks' tensors are on disk ({self.offloaded.folder}): export the model, "
                "or call in_memory() first if it fits in memory"
            )


def export_graph(graph_module: fx.GraphModule, signature: GraphSignature) -> torch.export.ExportedProgram:
    """A compiled graph re-exported (non-strict) as a ``torch.export`` program sharing its tensors."""
    try:
        with torch.no_grad():
            return torch.export.export(
                graph_module, signature.args, signature.kwargs, dynamic_shapes=signature.dynamic_shapes, strict=False
            )
    except Exception as error:  # torch.export raises many unrelated types; keep the cause
        raise ExportError(
            f"torch.export could not capture the compiled graph: {type(error).__name__}: {error}"
        ) from error


@dataclass(frozen=True)
class Analysis:
    """What FPTQ decides for a model before anything is quantized (``fptq inspect``).

    ``graph_module`` (in ``captured``) is still the float graph.
    """

    captured: CapturedModel
    plan: QuantPlan
    """Each group records its candidates' measured int8 SQNR (``candidate_sqnr_db``)."""
    stats: ActivationStats
    calibration_tokens: int | None
    """Tokens a causal LM was calibrated on; None for a graph calibrated on its own inputs."""
    seconds_per_step: dict[str, float]


def _analysis_steps(config: CompileConfig) -> tuple[str, ...]:
    """The steps of capture, calibration and planning (block by block, one calibration step
    measures the errors too)."""
    if config.calibrate_by_block:
        return ("capture", "calibration", "analyze_sensitivity")
    return ("capture", "calibration", "measure_activation_error", "analyze_sensitivity")


ModelInput = nn.Module | LoadedModel | torch.export.ExportedProgram
"""What ``compile`` takes: a Hugging Face causal LM (or a :class:`LoadedModel`), any module
with ``example_inputs``, an exported program or a graph module."""


@fewer_collections()
def analyze(
    model: ModelInput,
    calibration: CalibrationSource | Sequence[Any],
    config: CompileConfig | None = None,
    *,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    tokenizer: Any = None,
    num_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
) -> Analysis:
    """Capture, calibrate and plan: the per-layer statistics and decisions, no quantization.

    Arguments as for :func:`compile`.
    """
    config = config or CompileConfig()
    steps = StepProgress("analyze", _analysis_steps(config), progress)
    inputs = _ModelInputs(example_inputs, dynamic_shapes, tokenizer, num_samples, seq_len)
    analysis, _ = _analyze(model, calibration, config, inputs, steps, None)
    steps.close()
    return analysis


@dataclass(frozen=True)
class _ModelInputs:
    """How the model is fed: its own example inputs, or token ids drawn from text."""

    example_inputs: Any
    dynamic_shapes: Any
    tokenizer: Any
    num_samples: int
    seq_len: int


def _capture_and_batches(
    model: ModelInput, calibration: Any, config: CompileConfig, inputs: _ModelInputs, steps: StepProgress
) -> tuple[CapturedModel, list[Any], list[Any], int | None]:
    """The captured graph, its calibration batches, the batches that measure candidate errors,
    and the number of calibration tokens (a causal LM's)."""
    if isinstance(model, LoadedModel):
        inputs = dataclasses.replace(inputs, tokenizer=inputs.tokenizer or model.tokenizer)
        model = model.model
    if not isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        raise ConfigError(
            f"model must be a torch.nn.Module, LoadedModel or torch.export.ExportedProgram, got {type(model).__name__}"
        )
    if isinstance(model, torch.export.ExportedProgram) or _has_own_inputs(model, calibration, inputs.example_inputs):
        # Any graph with its own inputs: calibration batches follow its signature.
        batches = input_batches(calibration)
        example = batches[0] if inputs.example_inputs is None else inputs.example_inputs
        with steps.step("capture"):
            captured = capture_graph(model, example, inputs.dynamic_shapes)
        return captured, batches, batches[: config.error_samples], None
    # Calibration tokens first: a bad source fails before the slow capture.
    vocab_size, max_sequence_length = model_limits(model)
    token_ids = calibration_token_ids(
        calibration, inputs.tokenizer, inputs.num_samples, inputs.seq_len, vocab_size, max_sequence_length
    )
    offloaded = placed_off_the_cpu(model)
    if offloaded and not config.calibrate_by_block:
        raise ConfigError(
            "a model with its blocks on disk or GPUs (offloaded) compiles block by block: set calibrate_by_block"
        )
    with steps.step("capture"):
        # Graph of (ids, past cache) -> (logits, present cache), all lengths dynamic; an
        # offloaded model's blocks stay where they are (meta tensors in the graph).
        captured = capture_offloaded(model) if offloaded else capture(model)
    size = config.calibration_batch_size
    error_batches = list(token_ids[: config.error_samples].split(size))
    return captured, list(token_ids.split(size)), error_batches, int(token_ids.numel())


def _has_own_inputs(model: nn.Module, calibration: Any, example_inputs: Any) -> bool:
    """Whether the module is called with its own inputs rather than captured as a causal LM:
    example inputs given, a graph module, or calibration batches of tensors, tuples or dicts."""
    if example_inputs is not None or isinstance(model, fx.GraphModule):
        return True
    batches = isinstance(calibration, (list, tuple)) and bool(calibration)
    return batches and all(isinstance(batch, (torch.Tensor, tuple, dict)) for batch in calibration)


def _analyze(
    model: ModelInput,
    calibration: Any,
    config: CompileConfig,
    inputs: _ModelInputs,
    steps: StepProgress,
    hessian_dtype: torch.dtype | None,
) -> tuple[Analysis, list[Any]]:
    """The analysis, and the calibration batches it ran."""
    captured, batches, error_batches, calibration_tokens = _capture_and_batches(
        model, calibration, config, inputs, steps
    )
    graph_module = captured.graph_module
    # Decoder linears are quantized; lm_head, embeddings and ignored layers stay float.
    linears, skipped = select_linears(captured.linears, config)
    skipped = (*skipped, *captured.unsupported)
    errors = None
    if config.calibrate_by_block:
        causal_lm = model.model if isinstance(model, LoadedModel) else model
        if captured.kv_layout is None or not isinstance(causal_lm, nn.Module):
            raise ConfigError("calibrate_by_block calibrates a Hugging Face causal LM's decoder blocks")
        with steps.step("calibration"):
            # The observers and error probes below, on one block graph at a time.
            error_inputs = error_batches if config.error_samples else []
            stats, errors = calibrate_by_block(
                causal_lm, linears, batches, error_inputs, config, hessian_dtype, steps.enabled
            )
    else:
        with steps.step("calibration"):
            # Temporary observers measure per-channel max|X| of each linear input (and its
            # Hessian for GPTQ), then leave.
            insert_observers(graph_module, linears, hessian_dtype)
            observed = with_calibration_kernels(probes_only(graph_module, ActivationObserver))
            run_batches(
                functools.partial(captured.run, module=observed), batches, steps.enabled, config.calibration_dtype
            )
            stats = read_activation_stats(graph_module)
            remove_observers(graph_module)
        with steps.step("measure_activation_error"):
            # Temporary probes measure every candidate's int8 error on a few calibration sequences.
            if config.error_samples:
                insert_error_probes(graph_module, activation_candidates(graph_module, linears, stats, config))
                probed = with_calibration_kernels(probes_only(graph_module, ActivationErrorProbe))
                run_batches(
                    functools.partial(captured.run, module=probed), error_batches, False, config.calibration_dtype
                )
                errors = read_activation_errors(graph_module)
                remove_error_probes(graph_module)
    with steps.step("analyze_sensitivity"):
        # The policy per activation group: static / LAE + static / per-token dynamic.
        plan = analyze_sensitivity(graph_module, linears, skipped, stats, config, errors)
    return Analysis(captured, plan, stats, calibration_tokens, steps.seconds), batches


@fewer_collections()
def compile(
    model: ModelInput,
    calibration: CalibrationSource | Sequence[Any],
    config: CompileConfig | None = None,
    *,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    passes: Sequence[Pass] = DEFAULT_PASSES,
    tokenizer: Any = None,
    num_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
    offload_folder: str | os.PathLike[str] | None = None,
) -> CompiledModel:
    """Quantize a model to W4A8 with FPTQ.

    A Hugging Face causal LM (or a :class:`LoadedModel`) is captured with its key/value
    cache; ``calibration`` is token ids ``[n, seq]`` or a source from
    :mod:`fptq_compile.calibration` (text needs ``tokenizer``, or a :class:`LoadedModel`);
    ``num_samples`` windows of ``seq_len`` tokens are drawn from text.

    Any other ``nn.Module`` (given ``example_inputs``), a ``torch.export.ExportedProgram``
    or a ``torch.fx.GraphModule`` from one keeps its own signature: ``calibration`` is a list
    of batches, each a tensor, a tuple of positional inputs or a dict of keyword inputs (such
    a list alone also selects this path, e.g. for an encoder);
    ``example_inputs`` defaults to the first batch and ``dynamic_shapes`` (as
    ``torch.export`` takes them) to every dimension ``Dim.AUTO``.

    ``passes`` are the
    transforms run on the graph after planning; pass your own list to add or drop one.
    With ``weights.rounding = gptq`` (the default), :func:`gptq_weights` runs right before
    :func:`insert_w4a8_qdq` on the Hessians calibration collected (a list without
    ``insert_w4a8_qdq`` quantizes no weights, so it gets no GPTQ). The user's model is
    left unchanged.

    A causal LM loaded with its blocks on disk or GPUs (:func:`fptq_compile.offload.load_offloaded`)
    is compiled with one block in memory at a time (``calibrate_by_block`` must be set), each
    block calibrated where it is placed: the passes run on the CPU once per block on its
    slice of the plan, and each finished block's tensors are written to ``offload_folder``
    (default: a temporary folder kept as long as the result), which the result reads them
    from (:attr:`CompiledModel.offloaded`).
    """
    config = config or CompileConfig()
    uses_gptq = config.weights.rounding is WeightRounding.GPTQ and insert_w4a8_qdq in passes
    if uses_gptq and isinstance(calibration, RandomTokens):
        warnings.warn(
            "GPTQ on data-free (random-token) calibration measured worse than round to nearest on SmolLM2 "
            "(41.07 vs 40.68 PPL): calibrate on text, or set weights.rounding to nearest",
            UserWarning,
            stacklevel=3,
        )
    causal_lm = model.model if isinstance(model, LoadedModel) else model
    offloaded = isinstance(causal_lm, nn.Module) and placed_off_the_cpu(causal_lm)
    if offloaded and config.kv_cache_int8:
        raise ConfigError("an int8 KV cache is not yet compiled for a model with its blocks on disk (offloaded)")
    if offloaded:
        return_freed_memory_at_once()  # each block's freed tensors leave, not only the first's
    transform_steps = ["quantize_blocks"] if offloaded else [*map(pass_name, passes), *(["gptq_weights"] * uses_gptq)]
    steps = StepProgress("compile", (*_analysis_steps(config), *transform_steps), progress)
    # Capture, calibrate, plan: what happens to every linear, decided before any edit. An
    # offloaded model's Hessians are collected block by block, as each block is quantized.
    inputs = _ModelInputs(example_inputs, dynamic_shapes, tokenizer, num_samples, seq_len)
    hessian_dtype = getattr(torch, config.weights.gptq.hessian_dtype.value) if uses_gptq else None
    analysis, batches = _analyze(model, calibration, config, inputs, steps, None if offloaded else hessian_dtype)
    graph_module, plan = analysis.captured.graph_module, analysis.plan
    bytes_before = _linear_weight_bytes(graph_module, plan)
    store = None
    if offloaded:
        assert isinstance(causal_lm, nn.Module)
        store = TensorStore(offload_folder)
        linears, _ = select_linears(analysis.captured.linears, config)
        with steps.step("quantize_blocks"):
            pass_reports = _transform_by_block(
                causal_lm, graph_module, plan, linears, batches, passes, hessian_dtype, config, store, steps.enabled
            )
    else:
        pass_reports = {}
        for transform in _with_gptq(passes, analysis.stats, config) if uses_gptq else passes:
            name = pass_name(transform)
            with steps.step(name):
                # Each transform reads the plan; the runner lints and recompiles after it.
                result: PassResult = run_pass(transform, graph_module, plan)
            graph_module = result.graph_module
            pass_reports[name] = {"modified": result.modified, **dict(result.report)}
    steps.close()
    drop_unused_attributes(graph_module)
    report = CompileReport(
        seconds_per_step=steps.seconds,
        pass_reports=pass_reports,
        plan_summary=plan.summary(),
        calibration_tokens=analysis.calibration_tokens,
        peak_rss_bytes=peak_rss_bytes(),
        linear_weight_bytes={"float32": bytes_before, "compiled": _compiled_weight_bytes(graph_module)},
        capture_route=analysis.captured.route,
    )
    captured = analysis.captured
    return CompiledModel(graph_module, plan, report, captured.kv_layout, config, captured.signature, store)


def _transform_by_block(
    model: nn.Module,
    graph_module: fx.GraphModule,
    plan: QuantPlan,
    linears: Sequence[LinearSite],
    batches: Sequence[torch.Tensor],
    passes: Sequence[Pass],
    hessian_dtype: torch.dtype | None,
    config: CompileConfig,
    store: TensorStore,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Run ``passes`` on the whole graph one decoder block at a time: the block's tensors are
    read into the graph, the passes transform its slice of the plan, and the tensors it then
    reads are written to ``store`` (``meta`` tensors left in their place)."""
    in_memory = {target for target in attribute_targets(graph_module) if not _is_meta(graph_module, target)}
    reports: dict[str, dict[str, Any]] = {}
    uses_gptq = hessian_dtype is not None
    for block in blocks_in_turn(model, linears, batches, hessian_dtype, progress, config.calibration_dtype):
        prefix = f"{graph_attribute(block.path)}."
        for target in attribute_targets(graph_module):
            if target.startswith(prefix):
                # Handed over: a float weight the passes replace is then held by nothing.
                replace_tensor(graph_module, target, block.tensors.pop(target.removeprefix(prefix)))
        block_plan = plan.restricted_to(block.linears)
        for transform in _with_gptq(passes, block.stats, config) if uses_gptq else passes:
            # Recompiling the whole graph after every pass of every block would cost O(blocks²).
            result = run_pass(transform, graph_module, block_plan, recompile=False)
            _merge_report(reports.setdefault(pass_name(transform), {}), result)
        drop_unused_attributes(graph_module)  # the block's float weights, once quantized
        finished = [
            target
            for target in attribute_targets(graph_module)
            if target not in in_memory and not _is_meta(graph_module, target)
        ]
        store.offload(graph_module, finished, f"block_{block.index:05d}.safetensors")
        del block  # its float tensors, before the next block is read
    graph_module.graph.lint()
    graph_module.recompile()
    return reports


def _is_meta(graph_module: fx.GraphModule, target: str) -> bool:
    return fetch_tensor(graph_module, target).device.type == "meta"


def _merge_report(merged: dict[str, Any], result: PassResult) -> None:
    """Add one block's pass report to the whole model's: counts add up, per-node tables join."""
    merged["modified"] = merged.get("modified", False) or result.modified
    for key, value in result.report.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = merged.get(key, 0) + value
        else:
            merged[key] = value


def _with_gptq(passes: Sequence[Pass], stats: ActivationStats, config: CompileConfig) -> tuple[Pass, ...]:
    """``passes`` with GPTQ bound to the calibration Hessians right before ``insert_w4a8_qdq``."""
    gptq: Pass = functools.partial(gptq_weights, stats=stats, settings=config.weights.gptq)
    position = list(passes).index(insert_w4a8_qdq)
    return (*passes[:position], gptq, *passes[position:])


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: Linux's ``VmHWM`` where there is one
    (``ru_maxrss`` carries a parent's peak across ``exec``), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _linear_weight_bytes(graph_module: fx.GraphModule, plan: QuantPlan) -> int:
    """Bytes of the float weights of the planned linears, before quantization."""
    total = 0
    planned = {layer.node for layer in plan.layers}
    for node in graph_module.graph.nodes:
        if node.name in planned and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            weight = fetch_tensor(graph_module, str(node.args[1].target))
            total += weight.numel() * weight.element_size()
    return total


def _compiled_weight_bytes(graph_module: fx.GraphModule) -> int:
    """Bytes of the quantized weights (int4 two per byte, as exporters pack them) with their scales."""
    total = 0
    for name, buffer in graph_module.named_buffers():
        if name.endswith("_weight_int4"):
            total += (buffer.numel() + 1) // 2
        elif name.endswith(("_weight_int8", "_weight_scale", "_weight_zero_point")):
            total += buffer.numel() * buffer.element_size()
    return total
