"""Text generation with a key/value cache, over any model that takes one step at a time.

The compiled torch graph (:class:`fptq_compile.CompiledModel`) and the ONNX Runtime
session wrapper share this loop: the prompt is prefilled once, then each new token is
one cached step.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from fptq_compile.capture import KVCache, KVCacheLayout
from fptq_compile.errors import UnsupportedGraphError


class CachedCausalLM(Protocol):
    @property
    def kv_layout(self) -> KVCacheLayout | None: ...

    def step(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]: ...


def generate_ids(
    model: CachedCausalLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New token ids ``[max_new_tokens or fewer]`` after ``prompt_ids [seq]``.

    ``temperature == 0`` is greedy; otherwise tokens are sampled from ``softmax(logits / t)``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if model.kv_layout is None:
        raise UnsupportedGraphError("generation needs a causal LM with a key/value cache")
    past = model.kv_layout.empty(1)
    step_ids = prompt_ids.reshape(1, -1)
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits, past = model.step(step_ids, past)
        last = logits[0, -1].float()
        if temperature == 0:
            token = int(last.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(last / temperature, dim=-1), 1, generator=generator))
        new_tokens.append(token)
        if token == eos_token_id:
            break
        step_ids = torch.tensor([[token]], dtype=torch.int64)
    return torch.tensor(new_tokens, dtype=torch.int64)


def generate_text(
    model: CachedCausalLM,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The prompt's continuation as text (greedy by default), stopping at end of sequence."""
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = generate_ids(model, prompt_ids, max_new_tokens, eos, temperature, generator)
    return str(tokenizer.decode(ids, skip_special_tokens=True))
