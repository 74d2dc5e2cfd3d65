"""Run an exported model with ONNX Runtime: cached steps, whole-sequence logits, generation.

:class:`OrtCausalLM` has the same ``step``/``kv_layout`` interface as the compiled torch
model, so :func:`fptq_compile.generate_text` and the perplexity evaluator run on both.

A model with an ``attention_mask`` input (the ``ort`` layout, every attention fused) runs
on one key/value buffer per layer that is longer than the cache it holds: it is bound as
both the past input and the present output, so ONNX Runtime's ``GroupQueryAttention``
writes each step's keys and values into it in place instead of copying the whole cache
into a new output. The caches :meth:`OrtCausalLM.step` returns are views of that buffer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fptq_compile.capture import KVCache, KVCacheLayout
from fptq_compile.errors import ExportError
from fptq_compile.exporters.onnx_ort_fusions import ATTENTION_MASK

_PAST = re.compile(r"past_key_values\.(\d+)\.key")
# A shared cache buffer holds a multiple of this many positions (it doubles when full).
BUFFER_MIN_LENGTH = 256


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
    """An exported decoder in an ``onnxruntime.InferenceSession``.

    With a shared cache buffer (see the module docstring) the cache a step returns is a view
    of the session's buffer, and stepping from it continues in place. Stepping from any other
    cache (a copy, an older view) is right too, but a step writes the buffer from the given
    cache's length on, so a view that reached further is then stale.
    """

    session: ort.InferenceSession
    kv_layout: KVCacheLayout
    shared_buffer: bool = False
    """The model takes ``attention_mask``: the cache lives in :attr:`_buffer`."""
    _buffer: list[np.ndarray] = field(default_factory=list, repr=False)
    """Per layer, key then value ``[batch, kv_heads, capacity, head_dim]``."""

    @classmethod
    def load(cls, path: str | os.PathLike[str] | bytes, threads: int | None = None, exact: bool = True) -> OrtCausalLM:
        """The model at ``path`` (a file, or a folder with ``model.onnx``), or a serialized model."""
        source: str | bytes
        if isinstance(path, bytes):
            source, name = path, "the serialized model"
        else:
            model_path = Path(path)
            if model_path.is_dir():
                model_path = model_path / "model.onnx"
            if not model_path.is_file():
                raise ExportError(f"no ONNX model at {model_path}")
            source = name = str(model_path)
        options = session_options(threads, exact)
        return cls.from_session(ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]), name)

    @classmethod
    def from_session(cls, session: ort.InferenceSession, name: str = "the model") -> OrtCausalLM:
        inputs = session.get_inputs()
        past = {int(m.group(1)): i for i in inputs if (m := _PAST.fullmatch(i.name))}
        if not past:
            raise ExportError(f"{name} has no past_key_values.N.key inputs: not an fptq decoder")
        _, heads, _, head_dim = past[0].shape
        shared = any(i.name == ATTENTION_MASK for i in inputs)
        return cls(session, KVCacheLayout(len(past), int(heads), int(head_dim)), shared)

    def step(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        if self.shared_buffer:
            return self._step_in_place(input_ids, past_key_values)
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

    def _step_in_place(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        batch, new = input_ids.shape
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        total = past_length + new
        self._hold(past_key_values, batch, past_length, total)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((batch, total), np.int64))
        binding.bind_output("logits")
        for index, name in enumerate(self._cache_names()):
            buffer = ort.OrtValue.ortvalue_from_numpy(self._buffer[index])
            binding.bind_ortvalue_input(f"past_key_values.{name}", buffer)
            binding.bind_ortvalue_output(f"present.{name}", buffer)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        views = [torch.from_numpy(buffer)[:, :, :total] for buffer in self._buffer]
        return torch.from_numpy(logits), list(zip(views[::2], views[1::2], strict=True))

    def _hold(self, past_key_values: KVCache, batch: int, past_length: int, total: int) -> None:
        """Make the buffer hold ``past_key_values`` (unless they are its views) with room for ``total``."""
        tensors = [tensor for pair in past_key_values for tensor in pair]
        own = (
            len(tensors) == len(self._buffer) > 0
            and self._buffer[0].shape[0] == batch
            and all(t.data_ptr() == b.ctypes.data for t, b in zip(tensors, self._buffer, strict=True))
        )
        capacity = self._buffer[0].shape[2] if self._buffer else 0
        if own and total <= capacity:
            return
        capacity = max(total, 2 * capacity if own else 0, BUFFER_MIN_LENGTH)
        capacity = -(-capacity // BUFFER_MIN_LENGTH) * BUFFER_MIN_LENGTH
        layout = self.kv_layout
        grown = [
            np.zeros((batch, layout.num_kv_heads, capacity, layout.head_dim), np.float32)
            for _ in range(2 * layout.num_layers)
        ]
        for target, tensor in zip(grown, tensors, strict=False):
            target[:, :, :past_length] = tensor.numpy()
        self._buffer = grown

    def _cache_names(self) -> list[str]:
        return [f"{layer}.{part}" for layer in range(self.kv_layout.num_layers) for part in ("key", "value")]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of whole sequences (empty cache)."""
        return self.step(input_ids, self.kv_layout.empty(input_ids.shape[0]))[0]
