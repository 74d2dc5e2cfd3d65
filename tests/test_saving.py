from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open

import fptq_compile as fptq
from fptq_compile.errors import ModelLoadError
from fptq_compile.saving import MANIFEST_FILE, WEIGHTS_FILE, is_saved_compiled, load_compiled, save_compiled


@pytest.fixture(scope="module")
def compiled(token_ids_module):
    # lm_head as an int8 weight-only layer: its codes are saved as they are, not packed.
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32, symmetric=False), int8_weight_only=("lm_head",)
    )
    return fptq.compile(tiny_llama(), token_ids_module, config, progress=False)


@pytest.fixture(scope="module")
def token_ids_module():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    save_compiled(compiled, folder)
    return folder


def test_a_loaded_model_computes_exactly_what_was_saved(compiled, saved, token_ids_module):
    loaded = load_compiled(saved)
    assert is_saved_compiled(saved)
    assert torch.equal(loaded(token_ids_module), compiled(token_ids_module))
    assert loaded.plan == compiled.plan
    assert loaded.config == compiled.config
    assert loaded.kv_layout == compiled.kv_layout
    assert loaded.report.plan_summary == compiled.report.plan_summary
    # Cached decoding works on the loaded graph too.
    _, cache = loaded.step(token_ids_module[:1, :5], loaded.kv_layout.empty(1))
    next_logits, _ = loaded.step(token_ids_module[:1, 5:6], cache)
    assert torch.allclose(next_logits[0, -1], compiled(token_ids_module[:1, :6])[0, -1], atol=1e-4)


def test_int4_codes_are_packed_and_tied_weights_stored_once(compiled, saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert len(manifest["int4_packed"]) == len(compiled.plan.layers) - 1  # all but the int8 lm_head
    with safe_open(str(saved / WEIGHTS_FILE), "pt") as weights:
        for name, length in manifest["int4_packed"].items():
            packed = weights.get_tensor(name)
            assert packed.dtype == torch.uint8 and packed.shape[-1] == (length + 1) // 2
        stored = set(weights.keys())
    assert not stored & set(manifest["aliases"])
    # The tiny Llama ties lm_head to the embeddings: one tensor on disk.
    embedding_bytes = 128 * 64 * 4
    assert (saved / WEIGHTS_FILE).stat().st_size < 2 * embedding_bytes + 64 * 1024


def test_another_format_version_is_refused_with_the_versions(saved, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    for path in saved.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"version 99.*recompile"):
        load_compiled(folder)


def test_truncated_weights_and_missing_folders_are_refused(saved, tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    for path in saved.iterdir():
        data = path.read_bytes()
        (folder / path.name).write_bytes(data[: len(data) // 2] if path.name == WEIGHTS_FILE else data)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_compiled(folder)
    with pytest.raises(ModelLoadError, match="no saved compiled model"):
        load_compiled(tmp_path / "nowhere")
