from __future__ import annotations

import math

import pytest
import torch

from fptq_compile.errors import CalibrationError
from fptq_compile.evaluate import perplexity, read_wikitext_rows


def test_uniform_logits_give_the_vocabulary_size():
    vocab = 17
    result = perplexity(
        lambda ids: torch.zeros(*ids.shape, vocab), torch.arange(100) % vocab, window=10, progress=False
    )
    assert result.windows == 10 and result.predicted_tokens == 90
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)


def test_windows_are_non_overlapping_and_the_remainder_dropped():
    seen = []

    def forward(ids):
        seen.append(ids.clone())
        return torch.zeros(*ids.shape, 4)

    result = perplexity(forward, torch.arange(25) % 4, window=10, batch_size=2, progress=False)
    assert result.windows == 2
    assert torch.equal(torch.cat(seen), (torch.arange(20) % 4).reshape(2, 10))
    assert perplexity(forward, torch.arange(25) % 4, window=10, max_windows=1, progress=False).windows == 1


def test_a_perfect_model_has_perplexity_one():
    ids = torch.arange(30) % 5

    def forward(batch):
        logits = torch.full((*batch.shape, 5), -1e4)
        logits.scatter_(-1, ((batch + 1) % 5).unsqueeze(-1), 0.0)
        return logits

    assert perplexity(forward, ids, window=10, progress=False).mean_nll == pytest.approx(0.0, abs=1e-6)
    assert math.isclose(perplexity(forward, ids, window=10, progress=False).perplexity, 1.0, rel_tol=1e-6)


def test_too_short_text():
    with pytest.raises(CalibrationError, match="fewer than one window"):
        perplexity(lambda ids: ids, torch.arange(5), window=10, progress=False)


def test_wikitext_rows_follow_the_hf_loader(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = Title = \n \n Body text . \n", encoding="utf-8")
    assert read_wikitext_rows(path) == ["", " = Title = \n", "", " Body text . \n"]
