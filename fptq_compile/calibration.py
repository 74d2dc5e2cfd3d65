"""Calibration data: turn a source into token ids ``[num_samples, seq_len]``, and run it.

Sources: a tensor of token ids, a text file (:class:`TextFile` or a plain path), a list
of strings (:class:`Texts`), a Hugging Face dataset (:class:`HFDataset`, when the
``datasets`` package and the hub or its cache are reachable), and the paper's data-free
mode (:class:`RandomTokens`). Text is tokenized once; ``num_samples`` windows of
``seq_len`` tokens are drawn at seeded random offsets (the GPTQ convention).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from fptq_compile.config import CalibrationDtype
from fptq_compile.errors import CalibrationError


@dataclass(frozen=True)
class TextFile:
    path: Path


@dataclass(frozen=True)
class Texts:
    texts: tuple[str, ...]
    separator: str = "\n\n"


@dataclass(frozen=True)
class HFDataset:
    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"


@dataclass(frozen=True)
class RandomTokens:
    """Data-free calibration: uniform random token ids (reported to work in the paper)."""

    seed: int = 0


CalibrationSource = torch.Tensor | TextFile | Texts | HFDataset | RandomTokens | str | os.PathLike[str] | Sequence[str]


def calibration_token_ids(
    source: CalibrationSource,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    vocab_size: int | None,
    max_sequence_length: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` int64 token ids drawn from ``source``."""
    if isinstance(source, torch.Tensor):
        return _check_ids(source, vocab_size, max_sequence_length)
    if num_samples <= 0 or seq_len <= 1:
        raise CalibrationError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    if max_sequence_length is not None and seq_len > max_sequence_length:
        raise CalibrationError(f"seq_len {seq_len} is longer than the model allows ({max_sequence_length} positions)")
    if isinstance(source, RandomTokens):
        if not vocab_size:
            raise CalibrationError("data-free calibration needs the model's vocab_size")
        generator = torch.Generator().manual_seed(source.seed)
        return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    text = read_calibration_text(source)
    if not text.strip():
        raise CalibrationError(f"calibration text from {_describe(source)} is empty")
    if tokenizer is None:
        raise CalibrationError("text calibration needs a tokenizer")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    needed = num_samples * seq_len
    if ids.numel() < needed:
        raise CalibrationError(
            f"calibration text from {_describe(source)} has {ids.numel()} tokens, fewer than "
            f"num_samples x seq_len = {num_samples} x {seq_len} = {needed}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(num_samples)]
    return torch.stack([ids[start : start + seq_len] for start in starts])


def _check_ids(ids: torch.Tensor, vocab_size: int | None, max_sequence_length: int | None) -> torch.Tensor:
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise CalibrationError(
            f"calibration ids must be a non-empty integer tensor [n, seq], got {tuple(ids.shape)} {ids.dtype}"
        )
    if max_sequence_length is not None and ids.shape[1] > max_sequence_length:
        raise CalibrationError(
            f"calibration sequences of {ids.shape[1]} tokens exceed the model's {max_sequence_length}"
        )
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise CalibrationError(
            f"calibration ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.to(torch.int64)


def _describe(source: object) -> str:
    if isinstance(source, (TextFile,)):
        return str(source.path)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


def read_calibration_text(source: object) -> str:
    """The text of a text calibration source (file, strings, dataset), checked to be readable UTF-8."""
    if isinstance(source, (str, os.PathLike)):
        source = TextFile(Path(source))
    if isinstance(source, TextFile):
        try:
            return source.path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise CalibrationError(f"calibration file {source.path} does not exist") from error
        except UnicodeDecodeError as error:
            raise CalibrationError(f"calibration file {source.path} is not UTF-8 text: {error}") from error
        except OSError as error:
            raise CalibrationError(f"cannot read calibration file {source.path}: {error}") from error
    if isinstance(source, Texts):
        return source.separator.join(source.texts)
    if isinstance(source, HFDataset):
        return _read_hf_dataset(source)
    if isinstance(source, Sequence) and all(isinstance(item, str) for item in source):
        return "\n\n".join(source)
    raise CalibrationError(f"unsupported calibration source {type(source).__name__}")


def _read_hf_dataset(source: HFDataset) -> str:
    try:
        import datasets
    except ImportError as error:
        raise CalibrationError("calibration from a dataset name needs the `datasets` package") from error
    try:
        rows = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as error:  # hub unreachable, unknown name...: say which
        raise CalibrationError(f"could not load dataset {source.name!r}: {type(error).__name__}: {error}") from error
    return "\n\n".join(str(row[source.text_field]) for row in rows)


def run_calibration(
    forward: Callable[[torch.Tensor], object], token_ids: torch.Tensor, batch_size: int, progress: bool = True
) -> None:
    """Run ``token_ids`` through ``forward`` in batches (observers record what they see)."""
    run_batches(forward, token_ids.split(batch_size), progress)


def run_batches(
    forward: Callable[[Any], object],
    batches: Sequence[Any],
    progress: bool = True,
    dtype: CalibrationDtype = CalibrationDtype.FLOAT32,
) -> None:
    """Run every batch through ``forward``, under ``torch.no_grad``, its matrix products in ``dtype``."""
    with torch.no_grad(), matmul_precision(dtype, batches[0] if batches else None):
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            forward(batch)


def matmul_precision(dtype: CalibrationDtype, inputs: Any = None) -> contextlib.AbstractContextManager[object]:
    """The context to calibrate in: ``torch.autocast`` to bfloat16 on the device of the first
    tensor in ``inputs`` (CPU if none) for ``BFLOAT16``, nothing for ``FLOAT32``."""
    if dtype is CalibrationDtype.FLOAT32:
        return contextlib.nullcontext()
    tensors = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    return torch.autocast(tensors[0].device.type if tensors else "cpu", dtype=torch.bfloat16)


def input_batches(source: object) -> list[Any]:
    """Calibration for a graph with its own inputs (not a causal LM): a non-empty list or
    tuple of batches, each a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if not isinstance(source, (list, tuple)) or not source:
        raise CalibrationError(
            "calibrating a module on its own inputs takes a non-empty list of batches (each a tensor, a tuple "
            f"of positional inputs or a dict of keyword inputs), got {type(source).__name__}"
        )
    for index, batch in enumerate(source):
        if not isinstance(batch, (torch.Tensor, tuple, dict)):
            raise CalibrationError(
                f"calibration batch {index} is a {type(batch).__name__}: give a tensor, a tuple or a dict"
            )
    return list(source)
