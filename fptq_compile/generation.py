"""Greedy text generation over any ``ids -> logits`` callable (the compiled torch graph).

The captured graph has no KV cache, so each step recomputes the prefix: fine for a line
of text and for checking the reference; the ONNX runtime path is the fast one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def generate_greedy(
    forward: Callable[[torch.Tensor], torch.Tensor], tokenizer: Any, prompt: str, max_new_tokens: int = 32
) -> str:
    """The prompt's continuation, greedily decoded, stopping at the end-of-sequence token."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.int64)
    prompt_length = ids.shape[1]
    eos = getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            # The graph was captured with sequence length >= 2.
            step_ids = ids if ids.shape[1] >= 2 else torch.cat([ids, ids], dim=1)
            next_id = forward(step_ids)[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if eos is not None and int(next_id) == eos:
                break
    return str(tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True))
