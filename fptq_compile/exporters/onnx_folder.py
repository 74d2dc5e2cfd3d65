"""A self-contained folder: the ONNX decoder, its tokenizer, the plan and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fptq_compile.config import config_to_dict
from fptq_compile.exporters.onnx_qdq import OnnxExport, OnnxLayout, export_onnx
from fptq_compile.io import atomic_directory
from fptq_compile.pipeline import CompiledModel

MODEL_FILE = "model.onnx"


def export_folder(
    compiled: CompiledModel,
    tokenizer: Any,
    destination: str | os.PathLike[str],
    layout: OnnxLayout = OnnxLayout.ORT,
    overwrite: bool = False,
) -> OnnxExport:
    """Write ``model.onnx``, the tokenizer files, ``plan.json``, ``config.json`` and ``report.json``.

    Written into a temporary sibling and renamed at the end: a failure leaves nothing
    under ``destination``.
    """
    with atomic_directory(destination, overwrite=overwrite) as staging:
        result = export_onnx(compiled, staging / MODEL_FILE, layout)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "plan.json").write_text(compiled.plan.to_json(), encoding="utf-8")
        (staging / "config.json").write_text(json.dumps(config_to_dict(compiled.config), indent=1), encoding="utf-8")
        report = {**compiled.report.to_dict(), "onnx": {"layout": layout.value, "file_bytes": result.file_bytes}}
        (staging / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    final = Path(destination) / MODEL_FILE
    return OnnxExport(final, result.layout, result.int4_initializers, result.k_major_weights, result.file_bytes)
