from __future__ import annotations

import pytest
import torch

import fptq_compile as fptq
from fptq_compile.calibration import calibration_token_ids


class WordTokenizer:
    """One token per whitespace-separated word, ids from the word's length."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(word) % 50 for word in text.split()]}


def _ids(source, samples=3, seq_len=4, **kwargs):
    return calibration_token_ids(source, WordTokenizer(), samples, seq_len, vocab_size=50, **kwargs)


def test_text_file_list_and_texts(tmp_path):
    words = " ".join(f"w{'x' * (i % 7)}" for i in range(40))
    path = tmp_path / "calib.txt"
    path.write_text(words, encoding="utf-8")
    from_file = _ids(path)
    assert from_file.shape == (3, 4) and from_file.dtype == torch.int64
    assert torch.equal(_ids(fptq.TextFile(path)), from_file)
    assert torch.equal(_ids(str(path)), from_file)
    assert _ids(fptq.Texts((words, words))).shape == (3, 4)
    assert _ids([words]).shape == (3, 4)


def test_windows_are_reproducible_and_seeded(tmp_path):
    texts = fptq.Texts(tuple(f"{'a' * (i % 40)}" for i in range(200)), separator=" ")
    assert torch.equal(_ids(texts, seed=0), _ids(texts, seed=0))
    assert not torch.equal(_ids(texts, seed=0), _ids(texts, seed=1))


def test_random_tokens_are_in_vocab_and_seeded():
    ids = _ids(fptq.RandomTokens(seed=3), samples=5, seq_len=7)
    assert ids.shape == (5, 7) and int(ids.min()) >= 0 and int(ids.max()) < 50
    assert torch.equal(ids, _ids(fptq.RandomTokens(seed=3), samples=5, seq_len=7))


def test_too_few_tokens_says_how_many(tmp_path):
    with pytest.raises(fptq.CalibrationError, match=r"has 5 tokens, fewer than .* 3 x 4 = 12"):
        _ids(fptq.Texts(("a b c d e",)))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(fptq.CalibrationError, match="does not exist"):
        _ids(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 10)
    with pytest.raises(fptq.CalibrationError, match="not UTF-8"):
        _ids(binary)


def test_tensor_ids_are_checked():
    assert _ids(torch.tensor([[1, 2, 3]])).shape == (1, 3)
    with pytest.raises(fptq.CalibrationError, match=r"\[n, seq\]"):
        _ids(torch.tensor([1, 2, 3]))
    with pytest.raises(fptq.CalibrationError, match="lie in"):
        _ids(torch.tensor([[1, 99]]))


def test_unreachable_dataset_is_a_calibration_error():
    with pytest.raises(fptq.CalibrationError, match=r"datasets|could not load"):
        _ids(fptq.HFDataset("no-such/dataset-for-fptq"))
