"""DESIGN.md §6's data as the benchmarks read it, from ``../shared/data`` beside the checkout.

The package never reads it; a benchmark run as ``python benchmarks/NAME.py`` imports this
module from its own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def calibration_text() -> Any:
    """The tokenized WikiText-2 validation text as ``fptq_compile.Texts`` (its lines joined by
    spaces), which calibration draws its 512-token windows from."""
    import fptq_compile as fptq

    lines = (DATA / "wikitext-2-tokenized" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    return fptq.Texts(tuple(lines), separator=" ")


def wikitext_test_ids(tokenizer: Any) -> Any:
    """The WikiText-2 raw test text tokenized once, which the perplexity windows are cut from."""
    from fptq_compile.evaluate import wikitext_token_ids

    return wikitext_token_ids(DATA / "wikitext-2-raw" / "wiki.test.raw", tokenizer)
