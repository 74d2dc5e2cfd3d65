"""Perplexity with the project's evaluation protocol (DESIGN.md §6).

WikiText-2 raw test as the Hugging Face loader yields it: every line keeps its ``\\n``,
whitespace-only lines become empty strings; rows are joined with ``"\\n\\n"`` and
tokenized once without special tokens. Non-overlapping windows of ``window`` tokens
from the start, the remainder dropped; PPL = exp(mean NLL over all predicted tokens).
The package never ships the data: callers pass the file.
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class TaskResult:
    accuracy: float
    examples: int


def _continuation_requests(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Per (context, continuation): the ids of both and how many end ids are the continuation.

    As lm-evaluation-harness does it: the whole text is tokenized once and the
    continuation is what follows the context's own tokens.
    """
    requests = []
    for context, continuation in pairs:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        context_length = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        requests.append((whole, len(whole) - context_length))
    return requests


def _score_continuations(
    forward: Forward, requests: list[tuple[list[int], int]], batch_size: int, progress: bool, description: str
) -> list[tuple[float, bool]]:
    """Per request: the continuation's log-likelihood and whether greedy decoding produces it.

    Sequences are batched by length and right-padded: attention is causal, so padding
    after a sequence never changes its logits.
    """
    order = sorted(range(len(requests)), key=lambda index: len(requests[index][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress):
            longest = max(len(requests[index][0]) for index in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.int64)
            for row, index in enumerate(batch):
                ids[row, : len(requests[index][0])] = torch.tensor(requests[index][0])
            log_probs = torch.log_softmax(forward(ids).float(), dim=-1)
            for row, index in enumerate(batch):
                tokens, continuation = requests[index]
                targets = torch.tensor(tokens[len(tokens) - continuation :])
                predicted = log_probs[row, len(tokens) - continuation - 1 : len(tokens) - 1]
                log_likelihood = float(predicted.gather(-1, targets[:, None]).sum())
                results[index] = (log_likelihood, bool((predicted.argmax(-1) == targets).all()))
    return results


def lambada_accuracy(
    forward: Forward,
    tokenizer: Any,
    path: str | os.PathLike[str],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TaskResult:
    """LAMBADA (OpenAI's ``lambada_test.jsonl``): the share of texts whose last word greedy
    decoding predicts exactly, given everything before it (lm-evaluation-harness's
    ``lambada_openai`` accuracy)."""
    texts = [json.loads(line)["text"] for line in _read_lines(path)][:limit]
    pairs = [(text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]) for text in texts]
    scored = _score_continuations(forward, _continuation_requests(tokenizer, pairs), batch_size, progress, "lambada")
    return TaskResult(sum(greedy for _, greedy in scored) / len(scored), len(scored))


def piqa_accuracy(
    forward: Forward,
    tokenizer: Any,
    questions_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TaskResult:
    """PIQA, zero-shot: the share of questions whose right solution has the higher
    log-likelihood per byte (lm-evaluation-harness's ``piqa`` ``acc_norm``), with the
    prompt ``"Question: {goal}\\nAnswer:"``."""
    questions = [json.loads(line) for line in _read_lines(questions_path)][:limit]
    labels = [int(line) for line in _read_lines(labels_path)][: len(questions)]
    pairs = [
        (f"Question: {question['goal']}\nAnswer:", f" {question[solution]}")
        for question in questions
        for solution in ("sol1", "sol2")
    ]
    scored = _score_continuations(forward, _continuation_requests(tokenizer, pairs), batch_size, progress, "piqa")
    correct = 0
    for index, label in enumerate(labels):
        per_byte = [scored[2 * index + choice][0] / len(pairs[2 * index + choice][1].encode()) for choice in (0, 1)]
        correct += int(per_byte.index(max(per_byte)) == label)
    return TaskResult(correct / len(labels), len(labels))


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    try:
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise CalibrationError(f"cannot read evaluation data {path}: {error}") from error
