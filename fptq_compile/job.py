"""What ``fptq compile`` runs: the model, calibration, compile and export options, from a file.

A config file (``.toml``, ``.yaml``/``.yml`` or ``.json``) holds any of these keys; the
compile options are those of :class:`~fptq_compile.config.CompileConfig`::

    model = "path/to/model"          # omitted: the built-in SmolLM2-135M
    offload = false                  # true: blocks stay on disk, compiled one at a time
    max_memory = ["0=70GiB", "cpu=64GiB"]  # with offload: blocks on GPU 0, then memory, then disk
    ignore = ["model.layers.0.*"]
    int8_weight_only = ["lm_head"]   # int8 weights, float activations
    calibration_dtype = "float32"    # or bfloat16: matmuls in bfloat16 while calibrating

    [calibration]
    source = "random"                # or a UTF-8 text file
    samples = 32
    seq_len = 512

    [weights]
    group_size = 128
    symmetric = true

    [activations]
    policy = "fptq"                  # fptq, all_static, all_dynamic, weight_only
    static_threshold = 15.0
    dynamic_threshold = 150.0

    [export]
    layout = "ort"                   # ort or qdq

Every key is checked (unknown keys, types and allowed values name the key). The resolved
job, flags applied, is written next to the output as ``fptq_config.json``, which
``--config`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fptq_compile.config import CompileConfig, config_from_dict, config_to_dict, dataclass_from_dict
from fptq_compile.errors import ConfigError
from fptq_compile.exporters.onnx_qdq import OnnxLayout

RESOLVED_CONFIG_FILE = "fptq_config.json"


@dataclass(frozen=True)
class CalibrationOptions:
    source: str = "random"
    """``random`` (data-free, the paper's option) or the path of a UTF-8 text file."""
    samples: int = 32
    seq_len: int = 512

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("calibration.source must be 'random' or a text file path")
        if self.samples < 1:
            raise ConfigError(f"calibration.samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise ConfigError(f"calibration.seq_len must be at least 2, got {self.seq_len}")


@dataclass(frozen=True)
class ExportOptions:
    layout: OnnxLayout = OnnxLayout.ORT


@dataclass(frozen=True)
class JobConfig:
    model: str | None = None
    offload: bool = False
    """Load ``model`` (a Hugging Face checkpoint folder in safetensors) with its decoder
    blocks on disk and compile one block in memory at a time: ``calibrate_by_block``, which
    :func:`job_from_dict` sets unless the file says otherwise (the compile then refuses)."""
    max_memory: tuple[str, ...] = ()
    """With ``offload``, the memory the blocks may take per device (``"0=70GiB"``: GPU 0;
    ``"cpu=64GiB"``): they fill the GPUs, then CPU memory, the rest stays on disk
    (:func:`~fptq_compile.offload.placed_blocks`). Empty: every block on disk."""
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    compile: CompileConfig = field(default_factory=CompileConfig)
    export: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self) -> None:
        if self.offload and self.model is None:
            raise ConfigError("offload loads a Hugging Face checkpoint folder (safetensors): give the model folder")
        if self.max_memory:
            if not self.offload:
                raise ConfigError("max_memory places an offloaded model's blocks: it needs offload")
            parse_budget(self.max_memory)  # its entries, checked now
        if self.offload and self.compile.kv_cache_int8:
            raise ConfigError("an int8 KV cache (kv_cache_int8) is not supported with offload yet")
        # Refused here, before the compile: the exporter would refuse it after.
        if self.compile.kv_cache_int8 and self.export.layout is OnnxLayout.ORT:
            raise ConfigError("an int8 KV cache (kv_cache_int8) exports in the qdq layout only: add --layout qdq")


_JOB_KEYS = ("model", "offload", "max_memory", "calibration", "export")


def parse_budget(entries: Sequence[str]) -> dict[int | str, int | str]:
    """``["0=70GiB", "1=70GiB", "cpu=64GiB"]`` as accelerate's ``max_memory`` (a GPU index, or
    ``cpu``, then a size in bytes or with a unit accelerate reads: ``GiB``, ``GB``, ``MiB`` ...)."""
    from accelerate.utils import convert_file_size_to_int

    budget: dict[int | str, int | str] = {}
    for entry in entries:
        device, _, size = entry.partition("=")
        if not (device.isdigit() or device == "cpu") or not size:
            raise ConfigError(f"max_memory entry {entry!r} must be DEVICE=SIZE, DEVICE a GPU index or cpu")
        if not size.isdigit():
            try:
                convert_file_size_to_int(size)
            except ValueError as error:
                raise ConfigError(f"max_memory entry {entry!r}: {size!r} is not a size (e.g. 70GiB)") from error
        budget[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return budget


def job_from_dict(data: Mapping[str, Any]) -> JobConfig:
    """A :class:`JobConfig` from the flat layout of a config file (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config file must hold a table of keys, got {type(data).__name__}")
    allowed = (*_JOB_KEYS, *(f.name for f in dataclasses.fields(CompileConfig)))
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}; allowed: {', '.join(allowed)}")
    job_part = {key: value for key, value in data.items() if key in _JOB_KEYS}
    compile_part = {key: value for key, value in data.items() if key not in _JOB_KEYS}
    if job_part.get("offload") is True:
        compile_part.setdefault("calibrate_by_block", True)  # what offload means; an explicit false is refused
    compile_config = config_from_dict(compile_part)
    return dataclasses.replace(dataclass_from_dict(JobConfig, job_part), compile=compile_config)


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The job in the config-file layout, JSON-ready (what :func:`job_from_dict` reads)."""
    return {
        "model": job.model,
        "offload": job.offload,
        "max_memory": list(job.max_memory),
        "calibration": vars(job.calibration).copy(),
        **config_to_dict(job.compile),
        "export": {"layout": job.export.layout.value},
    }


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The keys of a ``.toml``, ``.yaml``/``.yml`` or ``.json`` config file, unvalidated."""
    import yaml

    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {file} must end in .toml, .yaml, .yml or .json")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ConfigError(f"config file {file} does not exist") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {file}: {error}") from error
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {file} is not valid {suffix.lstrip('.').upper()}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a table of keys, got {type(data).__name__}")
    return data
