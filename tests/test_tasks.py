from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_text, write_tiny_model

from fptq_compile.evaluate import lambada_accuracy, piqa_accuracy


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture
def lambada_file(tmp_path):
    lines = [json.dumps({"text": line}) for line in tiny_text(200, seed=3).splitlines()[:12]]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_an_oracle_scores_every_lambada_text(tokenizer, lambada_file):
    texts = [json.loads(line)["text"] for line in lambada_file.read_text().splitlines()]
    vocabulary = len(tokenizer)

    def oracle(ids: torch.Tensor) -> torch.Tensor:
        """Logits that put all mass on the token that really follows (the data is known)."""
        logits = torch.full((*ids.shape, vocabulary), -10.0)
        for row in range(ids.shape[0]):
            for text in texts:
                whole = tokenizer(text, add_special_tokens=False)["input_ids"]
                if ids[row, : len(whole)].tolist() == whole:
                    for position in range(len(whole) - 1):
                        logits[row, position, whole[position + 1]] = 10.0
        return logits

    result = lambada_accuracy(oracle, tokenizer, lambada_file, batch_size=5, progress=False)
    assert (result.accuracy, result.examples) == (1.0, 12)


def test_batching_and_padding_change_no_score(tokenizer, lambada_file, tmp_path):
    model = tiny_llama()
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    one = lambada_accuracy(forward, tokenizer, lambada_file, batch_size=1, progress=False)
    five = lambada_accuracy(forward, tokenizer, lambada_file, batch_size=5, progress=False)
    assert one == five
    questions = tmp_path / "piqa.jsonl"
    labels = tmp_path / "labels.lst"
    rows = [{"goal": "the city", "sol1": "of new york", "sol2": "was made"}] * 3
    questions.write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    labels.write_text("0\n1\n0\n", encoding="utf-8")
    single = piqa_accuracy(forward, tokenizer, questions, labels, batch_size=1, progress=False)
    batched = piqa_accuracy(forward, tokenizer, questions, labels, batch_size=4, progress=False)
    assert single == batched
    # The same question three times: one choice wins each time, so exactly the labels that name it count.
    assert single.accuracy in (pytest.approx(2 / 3), pytest.approx(1 / 3))
