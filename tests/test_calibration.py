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


def test_bfloat16_calibration_runs_the_matmuls_in_bfloat16_and_observes_float32_activations(token_ids):
    from conftest import tiny_llama

    model = tiny_llama()
    float32 = fptq.analyze(model, token_ids, progress=False)
    bfloat16 = fptq.analyze(
        model, token_ids, fptq.CompileConfig(calibration_dtype=fptq.CalibrationDtype.BFLOAT16), progress=False
    )
    assert float32.stats.per_linear.keys() == bfloat16.stats.per_linear.keys()
    differences = []
    for node, stats in float32.stats.per_linear.items():
        other = bfloat16.stats[node]
        assert other.channel_absmax.dtype == torch.float32 and other.num_tokens == stats.num_tokens
        differences.append(abs(other.tensor_absmax - stats.tensor_absmax) / stats.tensor_absmax)
    # bfloat16 products (8-bit mantissas) move the activations they feed, by about 2^-8: the
    # first block's inputs (embeddings) not at all, later ones by well under a few percent.
    assert min(differences) == 0.0 and 0.0 < max(differences) < 0.05
    # Attention ran in bfloat16: its output, which each o_proj reads, holds bfloat16 values.
    o_proj = [site.node for site in float32.captured.linears if site.module_path.endswith("o_proj")]
    assert o_proj
    for node in o_proj:
        absmax = bfloat16.stats[node].channel_absmax
        assert torch.equal(absmax.bfloat16().float(), absmax)
        assert not torch.equal(
            float32.stats[node].channel_absmax.bfloat16().float(), float32.stats[node].channel_absmax
        )
