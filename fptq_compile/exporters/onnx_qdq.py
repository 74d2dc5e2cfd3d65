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

import enum
import os
import tempfile
import warnings
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
    """Write ``compiled`` as an ONNX model at ``path`` (atomically) and check it."""
    if layout is OnnxLayout.ORT and compiled.plan.kv_cache_int8:
        # The Q/DQ in front of the cache splits the pattern onnxscript fuses into GroupQueryAttention.
        raise ExportError("an int8 KV cache (kv_cache_int8) exports in the qdq layout only (--layout qdq)")
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
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
        if kv_layout is not None:  # attention and norm fusions of a causal LM's decoder layers
            fusions = fuse_for_onnx_runtime(model, kv_layout.num_layers)
    _save_checked(model, destination)
    return OnnxExport(destination, layout, packed, k_major, _file_bytes(destination), merged, fusions)


def _save_checked(model: ir.Model, destination: Path) -> None:
    """Save next to ``destination``, run the full checker, then move into place."""
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
        for produced in staging.iterdir():
            os.replace(produced, destination.parent / produced.name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def _file_bytes(path: Path) -> int:
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
