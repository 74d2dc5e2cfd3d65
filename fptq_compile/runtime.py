"""Run an exported model with ONNX Runtime: cached steps, whole-sequence logits, generation.

:class:`OrtCausalLM` has the same ``step``/``kv_layout`` interface as the compiled torch
model, so :func:`fptq_compile.generate_text` and the perplexity evaluator run on both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fptq_compile.capture import KVCache, KVCacheLayout
from fptq_compile.errors import ExportError

_PAST = re.compile(r"past_key_values\.(\d+)\.key")


def session_options(threads: int | None = None, exact: bool = True) -> ort.SessionOptions:
    """ORT CPU options. ``exact``: fused int4 MatMuls compute in float (accuracy level 1)
    instead of quantizing activations to int8 inside the op (ORT's default, level 4)."""
    options = ort.SessionOptions()
    # Errors only: at its default level ORT logs one warning per scale its own int4 MatMul
    # fusion leaves unused (~90 lines for SmolLM2), nothing a user can act on.
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


@dataclass
class OrtCausalLM:
    """An exported decoder in an ``onnxruntime.InferenceSession``."""

    session: ort.InferenceSession
    kv_layout: KVCacheLayout

    @classmethod
    def load(cls, path: str | os.PathLike[str], threads: int | None = None, exact: bool = True) -> OrtCausalLM:
        model_path = Path(path)
        if model_path.is_dir():
            model_path = model_path / "model.onnx"
        if not model_path.is_file():
            raise ExportError(f"no ONNX model at {model_path}")
        session = ort.InferenceSession(
            str(model_path), session_options(threads, exact), providers=["CPUExecutionProvider"]
        )
        past = {int(m.group(1)): i for i in session.get_inputs() if (m := _PAST.fullmatch(i.name))}
        if not past:
            raise ExportError(f"{model_path} has no past_key_values.N.key inputs: not an fptq decoder")
        _, heads, _, head_dim = past[0].shape
        return cls(session, KVCacheLayout(len(past), int(heads), int(head_dim)))

    def step(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        feeds = {"input_ids": input_ids.numpy().astype(np.int64)}
        for layer, (key, value) in enumerate(past_key_values):
            feeds[f"past_key_values.{layer}.key"] = key.numpy()
            feeds[f"past_key_values.{layer}.value"] = value.numpy()
        logits, *present = self.session.run(None, feeds)
        cache = [
            (torch.from_numpy(present[2 * layer]), torch.from_numpy(present[2 * layer + 1]))
            for layer in range(self.kv_layout.num_layers)
        ]
        return torch.from_numpy(logits), cache

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of whole sequences (empty cache)."""
        return self.step(input_ids, self.kv_layout.empty(input_ids.shape[0]))[0]
