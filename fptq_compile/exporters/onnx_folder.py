"""A self-contained folder: the ONNX decoder, its tokenizer, the plan and the report."""

from __future__ import annotations

import dataclasses
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
    model_config: Any = None,
) -> OnnxExport:
    """Write ``model.onnx``, the tokenizer files, ``plan.json``, ``config.json`` and ``report.json``,
    and with the model's Hugging Face ``model_config`` a ``genai_config.json`` for onnxruntime-genai.

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
        if model_config is not None:
            genai = genai_config(compiled, model_config)
            (staging / "genai_config.json").write_text(json.dumps(genai, indent=1), encoding="utf-8")
    return dataclasses.replace(result, path=Path(destination) / MODEL_FILE)


def genai_config(compiled: CompiledModel, model_config: Any) -> dict[str, Any]:
    """An onnxruntime-genai ``genai_config.json`` for the exported decoder.

    onnxruntime-genai's session runs ORT's default accuracy level for fused int4 MatMuls
    (int8 activations inside the op), so its numbers are ``OrtCausalLM.load(exact=False)``'s.
    """
    kv = compiled.kv_layout

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
