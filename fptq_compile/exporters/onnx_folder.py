"""A self-contained output folder: the ONNX decoder, the saved compiled model, tokenizer and report.

Layout (everything written to a temporary sibling and renamed at the end):

- ``model.onnx``: the W4A8 decoder with its KV cache (:func:`export_onnx`);
- ``genai_config.json`` and ``config.json``: for onnxruntime-genai and Hugging Face
  tooling, when the model's Hugging Face config is given;
- tokenizer files;
- the saved compiled model (:mod:`fptq_compile.saving`): ``program.json``,
  ``weights.safetensors``, ``fptq_manifest.json``, ``plan.json``, ``compile_config.json``,
  ``compile_report.json``, so ``fptq export`` and ``fptq eval`` run without recompiling.
  A model compiled offloaded cannot be saved yet: its folder holds the last three only
  (the ONNX model is complete; ``export_folder`` warns);
- ``report.json``, ``report.html``, ``report.png`` (:mod:`fptq_compile.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fptq_compile.collector import fewer_collections
from fptq_compile.errors import ExportError
from fptq_compile.exporters.onnx_ort_fusions import ATTENTION_MASK
from fptq_compile.exporters.onnx_qdq import OnnxExport, OnnxLayout, export_onnx
from fptq_compile.io import atomic_directory
from fptq_compile.pipeline import CompiledModel
from fptq_compile.progress import StepProgress
from fptq_compile.report import build_report, write_report
from fptq_compile.saving import save_compile_records, save_compiled

MODEL_FILE = "model.onnx"


@fewer_collections()
def export_folder(
    compiled: CompiledModel,
    tokenizer: Any,
    destination: str | os.PathLike[str],
    layout: OnnxLayout = OnnxLayout.ORT,
    overwrite: bool = False,
    model_config: Any = None,
    report_fields: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
    progress: bool = True,
) -> OnnxExport:
    """Write the output folder described in the module docstring for ``compiled``.

    ``model_config`` is the model's Hugging Face config (for ``genai_config.json`` and
    ``config.json``); ``report_fields`` go into the report's summary (e.g. ``model``,
    ``perplexity``); ``extra_files`` maps more file names to their text. A failure leaves
    nothing under ``destination``.
    """
    if compiled.on_disk:
        warnings.warn(
            "the model was compiled offloaded: the output folder holds its ONNX model, plan and report but not "
            "the saved compiled model (fptq export / eval --backend torch need it; saving offloaded compiles "
            "is not supported yet)",
            stacklevel=3,
        )
    steps = StepProgress("export", ("onnx", "tokenizer and configs", "compiled model", "report"), progress)
    with atomic_directory(destination, overwrite=overwrite) as staging:
        with steps.step("onnx"):
            # One capture for the ONNX model and the saved model (an offloaded graph is traced on meta tensors).
            program = None if compiled.on_disk else compiled.exported_program()
            result = export_onnx(compiled, staging / MODEL_FILE, layout, program=program)
        with steps.step("tokenizer and configs"):
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if model_config is not None:
                model_config.save_pretrained(staging)
                attention_mask = result.fusions is not None and result.fusions.attention_mask
                genai = genai_config(compiled, model_config, attention_mask)
                (staging / "genai_config.json").write_text(json.dumps(genai, indent=1), encoding="utf-8")
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
        with steps.step("compiled model"):
            if program is None:
                save_compile_records(compiled, staging)
            else:
                save_compiled(compiled, staging, program=program)
        with steps.step("report"):
            onnx_summary = {"layout": layout.value, "file_bytes": result.file_bytes}
            write_report(build_report(compiled, onnx=onnx_summary, **dict(report_fields or {})), staging)
    steps.close()
    return dataclasses.replace(result, path=Path(destination) / MODEL_FILE, seconds_per_step=dict(steps.seconds))


def genai_config(compiled: CompiledModel, model_config: Any, attention_mask: bool = False) -> dict[str, Any]:
    """An onnxruntime-genai ``genai_config.json`` for the exported decoder (which takes an
    ``attention_mask`` input with ``attention_mask``).

    onnxruntime-genai's session runs ORT's default accuracy level for fused int4 MatMuls
    (int8 activations inside the op), so its numbers are ``OrtCausalLM.load(exact=False)``'s.
    """
    kv = compiled.kv_layout
    if kv is None:
        raise ExportError(
            "genai_config.json describes a causal LM's decoder: this compiled graph has no key/value cache"
        )

    def token_id(name: str) -> int:
        value = getattr(model_config, name, None)
        return int(value[0] if isinstance(value, list) else value) if value is not None else 0

    eos = token_id("eos_token_id")
    return {
        "model": {
            "type": str(getattr(model_config, "model_type", "llama")),
            "bos_token_id": token_id("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": token_id("pad_token_id") or eos,
            "context_length": int(getattr(model_config, "max_position_embeddings", 4096)),
            "vocab_size": int(model_config.vocab_size),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": kv.head_dim,
                "hidden_size": int(model_config.hidden_size),
                "num_attention_heads": int(model_config.num_attention_heads),
                "num_hidden_layers": kv.num_layers,
                "num_key_value_heads": kv.num_kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    **({"attention_mask": ATTENTION_MASK} if attention_mask else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": int(getattr(model_config, "max_position_embeddings", 4096)),
            "num_beams": 1,
            "past_present_share_buffer": False,
            "top_k": 1,
        },
    }
