"""Lower a compiled W4A8 graph to ONNX QDQ (opset 21) with a key/value cache.

The graph is lowered with torch.onnx's translator (:mod:`~fptq_compile.exporters.onnx_lowering`:
directly, or through ``torch.onnx.export``'s decomposition when an op needs it), the
``torch.ops.fptq`` ops mapped 1:1 by :mod:`fptq_compile.exporters.onnx_translations`, then rewritten with
``onnx_ir`` (:mod:`fptq_compile.exporters.onnx_rewrites`):

- weights: INT4 initializers with per-group scales, ``DequantizeLinear(block_size=g)``;
- static activations: int8 ``QuantizeLinear``/``DequantizeLinear`` with the calibrated scale;
- per-token dynamic activations: ``Abs/ReduceMax/Max/Div`` + ``QuantizeLinear``/``DequantizeLinear``;
- everything else float, LAE already folded into the norm weights.

Two layouts with the same numbers (:class:`OnnxLayout`): ``QDQ`` keeps the weights
``[N, K]`` as torch does (DQ -> Transpose -> MatMul); ``ORT`` stores them ``[K, N]``
(DQ -> MatMul), which ONNX Runtime CPU fuses into ``MatMulNBits``.

A causal LM's inputs are ``input_ids``, ``past_key_values.{i}.key|value`` (and, fused for
ONNX Runtime, ``attention_mask``: see :mod:`~fptq_compile.exporters.onnx_ort_fusions`); its
outputs ``logits``, ``present.{i}.key|value`` (``[batch, kv_heads, length, head_dim]``),
the names onnxruntime-genai and optimum use. Any other graph keeps the inputs it was captured with
(named as ``torch.onnx.export`` names them).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from torch.utils import _pytree as pytree

from fptq_compile.capture import GraphSignature, KVCacheLayout
from fptq_compile.collector import fewer_collections
from fptq_compile.errors import ExportError
from fptq_compile.exporters.onnx_fusion_check import fusion_mismatch, without_activation_qdq
from fptq_compile.exporters.onnx_lowering import Lowered, Route, lower
from fptq_compile.exporters.onnx_ort_fusions import OrtFusions, fuse_for_onnx_runtime
from fptq_compile.exporters.onnx_rewrites import (
    int4_weights_k_major,
    merge_parallel_matmuls,
    pack_int4_weights,
    static_qdq_as_unit_scale,
)
from fptq_compile.graph_utils import attribute_targets, fetch_tensor, replace_tensor, retarget_devices
from fptq_compile.offload import TensorStore
from fptq_compile.pipeline import CompiledModel, export_graph

OPSET = 21
# Models over this size keep their tensors in an external data file (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1 << 31
# Tensor bytes computed and waiting to be written at once while saving.
SAVE_IN_FLIGHT_BYTES = 1 << 28
# The fusion check serializes a model under this size in memory (faster than a file), a
# bigger one to a scratch file.
IN_MEMORY_CHECK_BYTES = 1 << 29


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
    lowering: str = Route.DIRECT.value
    """How torch.onnx lowered the graph (:class:`~fptq_compile.exporters.onnx_lowering.Route`)."""
    decomposed_because: str = ""
    """Why the graph was decomposed before its translation ("" when it was not)."""
    seconds_per_step: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Wall time of each step of :func:`~fptq_compile.exporters.export_folder` (empty from
    :func:`export_onnx` alone)."""


def io_names(kv_layout: KVCacheLayout) -> tuple[list[str], list[str]]:
    """Input and output names of the exported decoder."""
    cache = [f"{layer}.{part}" for layer in range(kv_layout.num_layers) for part in ("key", "value")]
    return ["input_ids", *(f"past_key_values.{name}" for name in cache)], [
        "logits",
        *(f"present.{name}" for name in cache),
    ]


@fewer_collections()
def export_onnx(
    compiled: CompiledModel,
    path: str | os.PathLike[str],
    layout: OnnxLayout = OnnxLayout.ORT,
    *,
    program: torch.export.ExportedProgram | None = None,
) -> OnnxExport:
    """Write ``compiled`` as an ONNX model at ``path`` (atomically) and check it.

    ``program`` is ``compiled.exported_program()`` when the caller has it already (the
    output folder shares it with saving); otherwise the export captures the graph itself.

    In the ``ort`` layout a causal LM's attention and norms are fused into ONNX Runtime's
    ops (:func:`fuse_for_onnx_runtime`), then the fused model is run against the compiled
    graph on a short prefill and decoding step
    (:func:`~fptq_compile.exporters.onnx_fusion_check.fusion_mismatch`). Where the fusion
    does not hold (ONNX Runtime refuses the model, or without activation quantization its
    logits differ from the compiled graph's by more than float rounding) or cannot be checked
    on a short input (a sliding-window model), the unfused graph is written instead, with a
    warning and the reason in :attr:`OrtFusions.unfused_reason`.
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
    if fuse and compiled.on_disk:
        unfused_reason = "the model was compiled offloaded: checking a fused graph needs the compiled graph in memory"
        fuse = False
    # The fusion runs onnxscript's optimizer itself (twice): the export skips its own pass then.
    model, export = _lower(compiled, layout, optimize=not fuse, program=program)
    if not fuse or kv_layout is None:
        _save_checked(model, destination, external=compiled.on_disk)
    else:
        export, unfused_reason = _save_fused(compiled, model, export, destination, kv_layout.num_layers)
    if unfused_reason:
        warnings.warn(
            f"ONNX Runtime fusions not applied: {unfused_reason}; the unfused graph is exported", stacklevel=3
        )
        export = dataclasses.replace(export, fusions=OrtFusions(0, 0, 0, unfused_reason))
    return dataclasses.replace(export, path=destination, file_bytes=_file_bytes(destination))


def _save_fused(
    compiled: CompiledModel, model: ir.Model, export: OnnxExport, destination: Path, num_layers: int
) -> tuple[OnnxExport, str]:
    """Fuse ``model`` for ONNX Runtime and save it if it still computes what ``compiled`` does
    (:func:`~fptq_compile.exporters.onnx_fusion_check.fusion_mismatch`); otherwise save the
    unfused model. Returns the export record and why fusion was refused ("")."""
    unfused = model.clone()  # the fallback (its tensors shared)
    fusions = fuse_for_onnx_runtime(model, num_layers)
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.unfused.", dir=destination.parent) as scratch:
        scratch_path = Path(scratch) / destination.name

        in_memory = _tensor_bytes(model) < IN_MEMORY_CHECK_BYTES
        if in_memory:  # saved, then serialized for the check: compute each tensor once
            for value in model.graph.initializers.values():
                if isinstance(value.const_value, ir.LazyTensor):
                    value.const_value.cache = True

        def without_qdq() -> Path | bytes:
            float_activations = without_activation_qdq(model)
            if in_memory:
                return ir.to_proto(float_activations).SerializeToString()
            _save(float_activations, scratch_path)
            return scratch_path

        reason = _save_checked(model, destination, verify=lambda fused: fusion_mismatch(compiled, fused, without_qdq))
        if reason:
            for leftover in Path(scratch).iterdir():
                leftover.unlink()
            _save(unfused, scratch_path)
            _place_checked(scratch_path, destination)
            return export, reason
    return dataclasses.replace(export, fusions=fusions), ""


def _lower(
    compiled: CompiledModel, layout: OnnxLayout, optimize: bool, program: torch.export.ExportedProgram | None = None
) -> tuple[ir.Model, OnnxExport]:
    """The compiled graph (or its ``program``) as ONNX in ``layout`` (not yet fused; constants
    folded with ``optimize``, never for an offloaded compile), with what was rewritten (path
    and size filled in once saved)."""
    signature = compiled.example_signature()
    if compiled.on_disk:
        lowered = _export_offloaded(compiled, signature)
    else:
        program = compiled.exported_program() if program is None else program
        lowered = _export(program, signature, compiled.kv_layout, optimize=optimize)
    model = lowered.model
    if compiled.on_disk or not optimize:
        # Without the optimizer the quantization scales stay Constant nodes; as initializers
        # the rewrites see them (static_qdq_as_unit_scale, without which ONNX Runtime does
        # not fuse the int4 MatMuls and holds every dequantized weight in float).
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    k_major = merged = 0
    if layout is OnnxLayout.ORT:
        k_major = int4_weights_k_major(model)
        static_qdq_as_unit_scale(model)
    packed = pack_int4_weights(model)  # by tensor name, so before merging renames them
    if layout is OnnxLayout.ORT:
        merged = merge_parallel_matmuls(model)
    export = OnnxExport(
        Path(), layout, packed, k_major, 0, merged, lowering=lowered.route.value, decomposed_because=lowered.reason
    )
    return model, export


def _export(
    program: torch.export.ExportedProgram, signature: GraphSignature, kv_layout: KVCacheLayout | None, optimize: bool
) -> Lowered:
    """The program lowered to ONNX (:func:`~fptq_compile.exporters.onnx_lowering.lower`), a
    causal LM's inputs and outputs named as runtimes expect (any other graph keeps its own)."""
    input_names, output_names = io_names(kv_layout) if kv_layout is not None else (None, None)
    return lower(
        program,
        opset=OPSET,
        dynamic_shapes=signature.dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        optimize=optimize,
    )


def _export_offloaded(compiled: CompiledModel, signature: GraphSignature) -> Lowered:
    """Export a graph whose blocks' tensors are on disk without reading them: the graph is
    traced on meta tensors, then each initializer reads its data (from the store, or the
    tensor in memory) only when the model is saved, one tensor at a time."""
    graph_module, store = compiled.graph_module, compiled.offloaded
    assert store is not None  # on_disk checked it
    in_memory: dict[str, torch.Tensor] = {}
    for target in attribute_targets(graph_module):
        tensor = fetch_tensor(graph_module, target)
        if tensor.device.type != "meta":
            in_memory[target] = tensor
            replace_tensor(graph_module, target, torch.empty_like(tensor, device="meta"))
    retarget_devices(graph_module, "cpu", "meta")
    try:
        meta_signature = dataclasses.replace(
            signature, args=pytree.tree_map(lambda value: _on_meta(value), signature.args)
        )
        # The optimizer folds constants: it would read every weight. ONNX Runtime folds them when loading.
        program = export_graph(graph_module, meta_signature)
        lowered = _export(program, meta_signature, compiled.kv_layout, optimize=False)
    finally:
        retarget_devices(graph_module, "meta", "cpu")
        for target, tensor in in_memory.items():
            replace_tensor(graph_module, target, tensor)
    for name, value in lowered.model.graph.initializers.items():
        placeholder = value.const_value
        assert placeholder is not None  # an initializer holds a tensor
        if name in in_memory:
            value.const_value = ir.tensor(in_memory[name].detach().numpy(), name=name)
        elif name in store.files:
            read = functools.partial(_read_offloaded, store, name)
            shape = ir.Shape(placeholder.shape.numpy())
            value.const_value = ir.LazyTensor(read, dtype=placeholder.dtype, shape=shape, name=name)
        else:
            raise ExportError(f"initializer {name} is neither in memory nor in the offload folder {store.folder}")
    return lowered


def _on_meta(value: object) -> object:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _read_offloaded(store: TensorStore, name: str) -> ir.TensorProtocol:
    return ir.tensor(store.load(name).numpy(), name=name)


def _save_checked(
    model: ir.Model, destination: Path, verify: Callable[[Path], str] | None = None, external: bool = False
) -> str:
    """Save next to ``destination`` (the tensors in an external data file if ``external`` or
    over 2 GB), then :func:`_place_checked`; return ``verify``'s refusal, the model not moved."""
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        staged = staging / destination.name
        _save(model, staged, external)
        return _place_checked(staged, destination, verify)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def _place_checked(staged: Path, destination: Path, verify: Callable[[Path], str] | None = None) -> str:
    """Run the full checker and ``verify`` (which returns why the model is wrong, or "") on
    the model saved at ``staged`` (named as ``destination``, so its external data file keeps
    its name), then move it and its data into ``destination``'s folder; return ``verify``'s
    refusal, the model not moved."""
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported model fails onnx.checker: {error}") from error
    refusal = verify(staged) if verify is not None else ""
    if not refusal:
        for produced in staged.parent.iterdir():
            os.replace(produced, destination.parent / produced.name)
    return refusal


def _save(model: ir.Model, path: Path, external: bool = False) -> None:
    """Write ``model`` at ``path``, its tensors in ``<name>.data`` beside it if ``external``
    or over 2 GB; the tensors are computed (read, transposed, packed) as they are written,
    a few at a time."""
    data_file = f"{path.name}.data" if external or _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD else None
    ir.save(model, path, external_data=data_file, max_in_flight_bytes=SAVE_IN_FLIGHT_BYTES)


def _tensor_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value)


def _file_bytes(path: Path) -> int:
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
