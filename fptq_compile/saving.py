"""Save a compiled model and load it back without recompiling.

A saved compiled model is a set of files in a folder:

- ``fptq_manifest.json``: format name and version, the fptq and torch versions that wrote
  it, the KV-cache layout, which tensors are packed int4 and which names alias another;
- ``program.json``: the compiled graph as a serialized ``torch.export`` program without
  its tensors (structure, dtypes and shapes: a few hundred kB);
- ``example_inputs.bin`` (a graph with its own inputs, not a causal LM): its example inputs;
- ``weights.safetensors``: every tensor the graph reads, once each (tied weights are
  stored once), the int4 weight codes packed two per byte;
- ``plan.json``, ``compile_config.json``, ``compile_report.json``.

Loading rebuilds the graph module from the program and puts the tensors in place; the
result computes exactly what the saved model did. A folder written by another format
version is refused with a message saying which versions are involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize

import fptq_compile.ops as fptq_ops  # noqa: F401  (the program calls torch.ops.fptq.*)
from fptq_compile.capture import GraphSignature, KVCacheLayout, auto_dynamic_shapes
from fptq_compile.collector import fewer_collections
from fptq_compile.config import config_from_dict, config_to_dict
from fptq_compile.errors import ExportError, ModelLoadError
from fptq_compile.pipeline import CompiledModel, CompileReport
from fptq_compile.plan import QuantPlan
from fptq_compile.primitives import pack_int4, unpack_int4

SAVED_FORMAT = "fptq-compiled-model"
SAVED_FORMAT_VERSION = 1
MANIFEST_FILE = "fptq_manifest.json"
PROGRAM_FILE = "program.json"
WEIGHTS_FILE = "weights.safetensors"
COMPILE_REPORT_FILE = "compile_report.json"
PLAN_FILE = "plan.json"
CONFIG_FILE = "compile_config.json"
EXAMPLE_INPUTS_FILE = "example_inputs.bin"
"""A graph with its own inputs (not a causal LM): its serialized example inputs."""


def is_saved_compiled(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a saved compiled model."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def save_compiled(
    compiled: CompiledModel,
    directory: str | os.PathLike[str],
    *,
    program: torch.export.ExportedProgram | None = None,
) -> None:
    """Write ``compiled`` into the existing folder ``directory`` (see the module docstring).

    ``program`` is ``compiled.exported_program()`` when the caller has it already (the
    output folder shares it with the ONNX export). Callers that need all-or-nothing output
    write into a staging folder (:func:`fptq_compile.io.atomic_directory`), as the exporters
    and the CLI do.
    """
    from fptq_compile import __version__

    if compiled.on_disk:
        raise ExportError(
            "this model was compiled offloaded (its blocks' tensors are on disk): saving it is not supported yet; "
            "export it with export_onnx, or call in_memory() first if it fits in memory"
        )
    folder = Path(directory)
    graph_module = compiled.graph_module
    # A causal LM's example inputs follow from its cache layout; any other graph keeps its own.
    own_inputs = compiled.kv_layout is None
    try:
        if program is None:
            program = compiled.exported_program()
        structure = serialize(
            program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=own_inputs
        )
    except Exception as error:  # torch.export/serialization raise many types: name the step
        raise ExportError(f"could not save the compiled graph: {type(error).__name__}: {error}") from error
    (folder / PROGRAM_FILE).write_bytes(structure.exported_program)
    if own_inputs:
        (folder / EXAMPLE_INPUTS_FILE).write_bytes(structure.example_inputs)
    program_tensors = {**program.state_dict, **program.constants}
    int4_codes = {str(node.args[0].target) for node in graph_module.graph.nodes if _is_int4_dequantize(node)}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored_by_identity: dict[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, value in sorted(program_tensors.items()):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"the compiled graph holds {name!r} of type {type(value).__name__}, not a tensor")
        tensor = value.detach()
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in stored_by_identity:  # a tied weight: store it once
            aliases[name] = stored_by_identity[identity]
            continue
        stored_by_identity[identity] = name
        tensors[name] = pack_int4(tensor) if name in int4_codes else tensor.contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    manifest = {
        "format": SAVED_FORMAT,
        "format_version": SAVED_FORMAT_VERSION,
        "fptq_version": __version__,
        "torch_version": torch.__version__,
        "kv_layout": None if compiled.kv_layout is None else vars(compiled.kv_layout),
        "int4_packed": {name: int(program_tensors[name].shape[-1]) for name in sorted(int4_codes)},
        "aliases": aliases,
        "parameters": sorted(name for name, value in program.state_dict.items() if isinstance(value, nn.Parameter)),
        "constants": sorted(program.constants),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    save_compile_records(compiled, folder)


def save_compile_records(compiled: CompiledModel, directory: str | os.PathLike[str]) -> None:
    """Write what the compile decided and measured, without the graph: ``plan.json``,
    ``compile_config.json`` and ``compile_report.json`` (part of :func:`save_compiled`;
    alone for a model compiled offloaded, which cannot be saved yet)."""
    folder = Path(directory)
    (folder / PLAN_FILE).write_text(compiled.plan.to_json(), encoding="utf-8")
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_dict(compiled.config), indent=1), encoding="utf-8")
    (folder / COMPILE_REPORT_FILE).write_text(json.dumps(compiled.report.to_dict(), indent=1), encoding="utf-8")


@fewer_collections()
def load_compiled(directory: str | os.PathLike[str]) -> CompiledModel:
    """The compiled model saved in ``directory`` by :func:`save_compiled`."""
    folder = Path(directory)
    manifest = _read_manifest(folder)
    try:
        structure = (folder / PROGRAM_FILE).read_bytes()
        kv_layout = None if manifest["kv_layout"] is None else KVCacheLayout(**manifest["kv_layout"])
        example_inputs = b"" if kv_layout is not None else (folder / EXAMPLE_INPUTS_FILE).read_bytes()
        stored = load_file(str(folder / WEIGHTS_FILE))
        plan = QuantPlan.from_json((folder / PLAN_FILE).read_text(encoding="utf-8"))
        config = config_from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
        report = CompileReport.from_dict(json.loads((folder / COMPILE_REPORT_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing, truncated or corrupt files
        raise ModelLoadError(f"cannot load the compiled model in {folder}: {type(error).__name__}: {error}") from error
    for name, length in manifest["int4_packed"].items():
        stored[name] = unpack_int4(stored[name], length)
    for alias, original in manifest["aliases"].items():
        stored[alias] = stored[original]
    parameters, constants = set(manifest["parameters"]), set(manifest["constants"])
    state_dict = {
        name: nn.Parameter(tensor, requires_grad=False) if name in parameters else tensor
        for name, tensor in stored.items()
        if name not in constants
    }
    try:
        # deserialize takes the tensors themselves where its annotation says their bytes.
        constant_tensors = {name: stored[name] for name in constants}
        artifact = SerializedArtifact(structure, state_dict, constant_tensors, example_inputs)  # type: ignore[arg-type]
        program = deserialize(artifact)
    except Exception as error:  # a program from another torch, or tensors that do not fit it
        raise ModelLoadError(
            f"cannot rebuild the compiled graph in {folder} (saved with torch {manifest.get('torch_version')}, "
            f"running torch {torch.__version__}): {type(error).__name__}: {error}"
        ) from error
    signature = None
    if kv_layout is None and program.example_inputs is not None:
        args, kwargs = program.example_inputs
        signature = GraphSignature(tuple(args), dict(kwargs), auto_dynamic_shapes(tuple(args), dict(kwargs)))
    return CompiledModel(program.module(), plan, report, kv_layout, config, signature)


def _read_manifest(folder: Path) -> dict[str, Any]:
    from fptq_compile import __version__

    path = folder / MANIFEST_FILE
    if not path.is_file():
        compiled_offloaded = (folder / PLAN_FILE).is_file()  # an output folder of an offloaded compile
        raise ModelLoadError(
            f"{folder} holds no saved compiled model (no {MANIFEST_FILE})"
            + ("; a model compiled offloaded is not saved, only its ONNX model" if compiled_offloaded else "")
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if manifest.get("format") != SAVED_FORMAT or manifest.get("format_version") != SAVED_FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} was saved as {manifest.get('format')!r} version {manifest.get('format_version')!r} "
            f"by fptq_compile {manifest.get('fptq_version', '?')}; this fptq_compile {__version__} reads "
            f"{SAVED_FORMAT!r} version {SAVED_FORMAT_VERSION}: recompile the model with this version"
        )
    return manifest


def _is_int4_dequantize(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target == torch.ops.fptq.dequantize_int4_groups.default
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "get_attr"
    )
