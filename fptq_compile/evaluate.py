"""Perplexity with the project's evaluation protocol (DESIGN.md §6).

WikiText-2 raw test as the Hugging Face loader yields it: every line keeps its ``\\n``,
whitespace-only lines become empty strings; rows are joined with ``"\\n\\n"`` and
tokenized once without special tokens. Non-overlapping windows of ``window`` tokens
from the start, the remainder dropped; PPL = exp(mean NLL over all predicted tokens).
The package never ships the data: callers pass the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fptq_compile.errors import CalibrationError

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    windows: int
    predicted_tokens: int


def read_wikitext_rows(path: str | os.PathLike[str]) -> list[str]:
    """The rows of a WikiText raw file as the Hugging Face ``wikitext`` loader yields them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise CalibrationError(f"cannot read evaluation text {path}: {error}") from error
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def wikitext_token_ids(path: str | os.PathLike[str], tokenizer: Any) -> torch.Tensor:
    """The evaluation text of ``path`` tokenized once, as a 1-D int64 tensor."""
    text = "\n\n".join(read_wikitext_rows(path))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def perplexity(
    forward: Forward,
    token_ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``forward`` (``[batch, seq] ids -> [batch, seq, vocab] logits``)."""
    num_windows = token_ids.numel() // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise CalibrationError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {window}")
    windows = token_ids[: num_windows * window].reshape(num_windows, window)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            logits = forward(batch)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, num_windows, total_tokens)
