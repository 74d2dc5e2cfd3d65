"""Lower a compiled W4A8 graph to ONNX QDQ (opset 21) with a key/value cache.

The graph is exported with ``torch.onnx.export(dynamo=True)``, the ``torch.ops.fptq``
ops mapped 1:1 by :mod:`fptq_compile.exporters.onnx_translations`, then rewritten with
``onnx_ir`` (:mod:`fptq_compile.exporters.onnx_rewrites`):

- weights: INT4 initializers with per-group scales, ``DequantizeLinear(block_size=g)``;
- static activations: int8 ``QuantizeLinear``/``DequantizeLinear`` with the calibrated scale;
- per-token dynamic activations: ``Abs/ReduceMax/Max/Div`` + ``QuantizeLinear``/``DequantizeLinear``;
- everything else float, LAE already folded into the norm weights.

Two layouts with the same numbers (:class:`OnnxLayout`): ``QDQ`` keeps the weights
``[N, K]`` as torch does (DQ -> Transpose -> MatMul); ``ORT`` stores them ``[K, N]``
(DQ -> MatMul), which ONNX Runtime CPU fuses into ``MatMulNBits``.

A causal LM's inputs are ``input_ids``, ``past_key_values.{i}.key|value``; its outputs
``logits``, ``present.{i}.key|value`` (``[batch, kv_heads, length, head_dim]``), the names
onnxruntime-genai and optimum use. Any other graph keeps the inputs it was captured with
(named as ``torch.onnx.export`` names them).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from fptq_compile.capture import KVCacheLayout
from fptq_compile.errors import ExportError
from fptq_compile.exporters.onnx_ort_fusions import OrtFusions, fuse_for_onnx_runtime
from fptq_compile.exporters.onnx_rewrites import (
    int4_weights_k_major,
    merge_parallel_matmuls,
    pack_int4_weights,
    static_qdq_as_unit_scale,
)
from fptq_compile.exporters.onnx_translations import TRANSLATION_TABLE
from fptq_compile.pipeline import CompiledModel

OPSET = 21
# Models over this size keep their tensors in an external data file (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1 << 31


class OnnxLayout(enum.Enum):
    QDQ = "qdq"
    """Portable QDQ: int4 weights ``[N, K]``, DequantizeLinear(axis=1) -> Transpose -> MatMul."""
    ORT = "ort"
    """ONNX Runtime CPU: int4 weights ``[K, N]``, DequantizeLinear(axis=0) -> MatMul (MatMulNBits),
    static activation Q/DQ with unit scales between a Div and a Mul (so the fusion happens)."""


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    layout: OnnxLayout
    int4_initializers: int
    k_major_weights: int
    file_bytes: int
    merged_matmuls: int = 0
    fusions: OrtFusions | None = None


def io_names(kv_layout: KVCacheLayout) -> tuple[list[str], list[str]]:
    """Input and output names of the exported decoder."""
    cache = [f"{layer}.{part}" for layer in range(kv_layout.num_layers) for part in ("key", "value")]
    return ["input_ids", *(f"past_key_values.{name}" for name in cache)], [
        "logits",
        *(f"present.{name}" for name in cache),
    ]


def export_onnx(
    compiled: CompiledModel, path: str | os.PathLike[str], layout: OnnxLayout = OnnxLayout.ORT
) -> OnnxExport:
    """Write ``compiled`` as an ONNX model at ``path`` (atomically) and check it.

    In the ``ort`` layout a causal LM's attention and norms are fused into ONNX Runtime's
    ops (:func:`fuse_for_onnx_runtime`), then the fused model is run against the compiled
    graph on a short prefill and decoding step. Where the fusion does not hold (ONNX Runtime
    refuses the model, or the logits differ) or cannot be checked on a short input (a
    sliding-window model), the unfused graph is written instead, with a warning and the
    reason in :attr:`OrtFusions.unfused_reason`.
    """
    if layout is OnnxLayout.ORT and compiled.plan.kv_cache_int8:
        # The Q/DQ in front of the cache splits the pattern onnxscript fuses into GroupQueryAttention.
        raise ExportError("an int8 KV cache (kv_cache_int8) exports in the qdq layout only (--layout qdq)")
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    kv_layout = compiled.kv_layout
    fuse = layout is OnnxLayout.ORT and kv_layout is not None
    unfused_reason = ""
    if fuse and kv_layout is not None and kv_layout.sliding_window is not None:
        unfused_reason = (
            f"sliding-window attention (window {kv_layout.sliding_window}): the GroupQueryAttention fusion "
            "drops the window"
        )
        fuse = False
    model, export = _lower(compiled, layout, fuse)
    if fuse:
        unfused_reason = _save_checked(model, destination, verify=lambda staged: _fusion_mismatch(compiled, staged))
        if unfused_reason:
            model, export = _lower(compiled, layout, fuse=False)
    if not fuse or unfused_reason:
        _save_checked(model, destination)
    if unfused_reason:
        warnings.warn(
            f"ONNX Runtime fusions not applied: {unfused_reason}; the unfused graph is exported", stacklevel=2
        )
        export = dataclasses.replace(export, fusions=OrtFusions(0, 0, 0, unfused_reason))
    return dataclasses.replace(export, path=destination, file_bytes=_file_bytes(destination))


def _lower(compiled: CompiledModel, layout: OnnxLayout, fuse: bool) -> tuple[ir.Model, OnnxExport]:
    """The compiled graph as ONNX in ``layout`` (fused for ONNX Runtime if ``fuse``), with
    what was rewritten (path and size filled in once saved)."""
    kv_layout = compiled.kv_layout
    signature = compiled.example_signature()
    # A causal LM's inputs and outputs get the names runtimes expect; any other graph keeps its own.
    input_names, output_names = io_names(kv_layout) if kv_layout is not None else (None, None)
    try:
        with warnings.catch_warnings():
            # An exported GraphModule refuses .eval(); its aten graph has no train/eval switch.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                compiled.graph_module,
                signature.args,
                kwargs=signature.kwargs or None,
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=TRANSLATION_TABLE,
                dynamic_shapes=signature.dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=True,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; keep the cause
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model: ir.Model = program.model
    k_major = merged = 0
    fusions = None
    if layout is OnnxLayout.ORT:
        k_major = int4_weights_k_major(model)
        static_qdq_as_unit_scale(model)
    packed = pack_int4_weights(model)  # by tensor name, so before merging renames them
    if layout is OnnxLayout.ORT:
        merged = merge_parallel_matmuls(model)
        if fuse and kv_layout is not None:  # attention and norm fusions of a causal LM's decoder layers
            fusions = fuse_for_onnx_runtime(model, kv_layout.num_layers)
    return model, OnnxExport(Path(), layout, packed, k_major, 0, merged, fusions)


# A fused model must give the compiled graph's logits to this relative max difference (an
# int8 rounding flip moves a logit by ~1e-3; a wrong fusion by far more).
FUSION_TOLERANCE = 1e-2


def _fusion_mismatch(compiled: CompiledModel, path: Path) -> str:
    """Why the fused model at ``path`` does not compute what ``compiled`` does ("" if it does),
    on a 2 x 5-token prefill and one decoding step."""
    from fptq_compile.runtime import OrtCausalLM

    assert compiled.kv_layout is not None  # only causal LMs are fused
    ids = torch.randint(0, 8, (2, 6), generator=torch.Generator().manual_seed(0))
    try:
        session = OrtCausalLM.load(path, exact=True)
        prefill, past = session.step(ids[:, :-1], compiled.kv_layout.empty(2))
        decode, _ = session.step(ids[:, -1:], past)
    except Exception as error:  # ONNX Runtime refuses the fused graph: say how
        return f"ONNX Runtime fails on the fused graph ({type(error).__name__}: {str(error)[:200]})"
    expected_prefill, expected_past = compiled.step(ids[:, :-1], compiled.kv_layout.empty(2))
    expected_decode, _ = compiled.step(ids[:, -1:], expected_past)
    for name, actual, expected in (("prefill", prefill, expected_prefill), ("decoding", decode, expected_decode)):
        relative = float((actual - expected).abs().max() / expected.abs().max())
        if not relative <= FUSION_TOLERANCE:
            return f"the fused graph's {name} logits differ from the compiled graph's by {relative:.2g} (relative)"
    return ""


def _save_checked(model: ir.Model, destination: Path, verify: Callable[[Path], str] | None = None) -> str:
    """Save next to ``destination``, run the full checker and ``verify`` (which returns why the
    staged model is wrong, or ""), then move into place; return ``verify``'s refusal, the
    model not moved."""
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        staged = staging / destination.name
        size = sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)
        external = f"{destination.name}.data" if size >= EXTERNAL_DATA_THRESHOLD else None
        ir.save(model, staged, external_data=external)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the exported model fails onnx.checker: {error}") from error
        refusal = verify(staged) if verify is not None else ""
        if not refusal:
            for produced in staging.iterdir():
                os.replace(produced, destination.parent / produced.name)
        return refusal
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def _file_bytes(path: Path) -> int:
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
