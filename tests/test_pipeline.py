from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import fptq_compile as fptq
from fptq_compile.passes import PassResult, insert_w4a8_qdq
from fptq_compile.primitives import sqnr_db


def _lae_config(**activations):
    # Thresholds low enough that this random model has static, LAE and dynamic groups.
    return fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32),
        activations=fptq.ActivationConfig(
            policy=fptq.ActivationPolicy.FPTQ, static_threshold=1.0, dynamic_threshold=10.0, **activations
        ),
    )


def test_tiny_llama_end_to_end(llama, token_ids):
    before = {name: p.detach().clone() for name, p in llama.named_parameters()}
    compiled = fptq.compile(llama, token_ids, _lae_config(), progress=False)
    counts = compiled.plan.activation_class_counts()
    assert counts["lae_static"] > 0 and counts["dynamic"] > 0
    assert len(compiled.plan.layers) == 14 and [s.module_path for s in compiled.plan.skipped] == ["lm_head"]
    report = compiled.report
    assert set(report.seconds_per_step) >= {"capture", "calibration", "analyze_sensitivity", "insert_w4a8_qdq"}
    assert report.pass_reports["fold_log_equalization"]["modified"]
    assert report.linear_weight_bytes["compiled"] < report.linear_weight_bytes["float32"] / 6
    test_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert sqnr_db(llama(test_ids).logits, compiled(test_ids)) > 15.0
    for name, parameter in llama.named_parameters():
        assert torch.equal(parameter, before[name]), f"compile changed the user's {name}"
    # The float weights of quantized linears no longer live in the compiled module.
    names = {name for name, _ in compiled.graph_module.named_parameters()}
    assert not any("q_proj" in name for name in names)


def test_a_user_pass_runs_in_the_pipeline(llama, token_ids):
    calls = []

    def count_qdq(graph_module, plan):
        calls.append(plan)
        found = sum(1 for n in graph_module.graph.nodes if str(n.target).startswith("fptq."))
        return PassResult(graph_module, modified=False, report={"fptq_ops": found})

    compiled = fptq.compile(llama, token_ids, _lae_config(), passes=[*fptq.DEFAULT_PASSES, count_qdq], progress=False)
    assert calls == [compiled.plan]
    assert compiled.report.pass_reports["count_qdq"]["fptq_ops"] > 14


def test_dropping_lae_needs_a_plan_without_it(llama, token_ids):
    with pytest.raises(fptq.PreconditionError, match=r"\[gptq_weights\].*run fold_log_equalization before"):
        fptq.compile(llama, token_ids, _lae_config(), passes=[insert_w4a8_qdq], progress=False)
    compiled = fptq.compile(llama, token_ids, _lae_config(use_lae=False), passes=[insert_w4a8_qdq], progress=False)
    assert compiled.plan.activation_class_counts()["lae_static"] == 0
    assert any("LAE disabled" in group.reason for group in compiled.plan.groups)


def test_gptq_runs_before_insert_w4a8_qdq_by_default_and_nearest_rounding_skips_it(llama, token_ids):
    compiled = fptq.compile(llama, token_ids, _lae_config(), progress=False)
    passes = ["fold_log_equalization", "gptq_weights", "insert_w4a8_qdq", "quantize_kv_cache"]
    assert list(compiled.report.pass_reports) == passes
    assert compiled.report.pass_reports["gptq_weights"]["gptq_linears"] == 14
    assert (
        "weight_sqnr_db" not in compiled.report.pass_reports["insert_w4a8_qdq"]
        or not (compiled.report.pass_reports["insert_w4a8_qdq"]["weight_sqnr_db"])
    )
    nearest = dataclasses.replace(
        _lae_config(), weights=fptq.WeightConfig(group_size=32, rounding=fptq.WeightRounding.NEAREST)
    )
    rounded = fptq.compile(llama, token_ids, nearest, progress=False)
    assert list(rounded.report.pass_reports) == [name for name in passes if name != "gptq_weights"]
    assert not any(layer.weight.gptq for layer in rounded.plan.layers)
    with torch.no_grad():
        reference = llama(token_ids).logits
        assert sqnr_db(reference, compiled(token_ids)) > sqnr_db(reference, rounded(token_ids))


def test_a_failing_user_pass_is_named(llama, token_ids):
    def broken(graph_module, plan):
        raise KeyError("boom")

    with pytest.raises(fptq.PassError, match=r"\[broken\] failed: KeyError"):
        fptq.compile(llama, token_ids, passes=[broken], progress=False)


def test_data_free_calibration(llama):
    with pytest.warns(UserWarning, match="GPTQ on data-free") as warned:
        compiled = fptq.compile(llama, fptq.RandomTokens(), num_samples=2, seq_len=16, progress=False)
    assert compiled.report.calibration_tokens == 32
    assert [w.filename for w in warned if "GPTQ" in str(w.message)] == [__file__]  # the caller's line


def test_cached_steps_match_whole_sequence_logits(llama, token_ids):
    compiled = fptq.compile(llama, token_ids, _lae_config(), progress=False)
    sequence = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    whole = compiled(sequence)
    logits, past = compiled.step(sequence[:, :7], compiled.kv_layout.empty(1))
    torch.testing.assert_close(logits, whole[:, :7], rtol=1e-4, atol=1e-4)
    for position in range(7, 12):
        logits, past = compiled.step(sequence[:, position : position + 1], past)
        torch.testing.assert_close(logits[:, 0], whole[:, position], rtol=1e-4, atol=1e-4)
    assert past[0][0].shape == (1, 2, 12, 16)


def test_greedy_generation_equals_argmax_of_whole_sequence(llama, token_ids):
    compiled = fptq.compile(llama, token_ids, progress=False)
    prompt = torch.tensor([5, 17, 42])
    generated = fptq.generate_ids(compiled, prompt, max_new_tokens=6)
    assert generated.shape == (6,)
    sequence = torch.cat([prompt, generated]).unsqueeze(0)
    expected = compiled(sequence)[0, len(prompt) - 1 : -1].argmax(-1)
    assert torch.equal(generated, expected)
    sampled = fptq.generate_ids(
        compiled, prompt, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.shape == (6,) and int(sampled.max()) < 128


# --- bad input gives a clear FptqError ------------------------------------------------


class _Wrapped(nn.Module):
    """Looks like an HF causal LM (returns .logits) but has no linear layer."""

    def forward(self, input_ids, use_cache=False):
        class Output:
            logits = input_ids.float().unsqueeze(-1) * 2

        return Output()


def test_model_with_no_linear_layers():
    with pytest.raises(fptq.UnsupportedGraphError, match="has no linear layer"):
        fptq.compile(_Wrapped(), torch.zeros(2, 8, dtype=torch.int64), progress=False)


def test_model_that_is_not_a_causal_lm():
    with pytest.raises(fptq.UnsupportedGraphError, match="not a supported causal LM"):
        fptq.compile(nn.Sequential(nn.Linear(4, 4)), torch.zeros(2, 8, dtype=torch.int64), progress=False)


def test_empty_calibration_text(llama):
    with pytest.raises(fptq.CalibrationError, match="empty"):
        fptq.compile(llama, fptq.Texts(("", "  ")), tokenizer=object(), seq_len=16, progress=False)


def test_sequence_longer_than_the_model_allows(llama):
    with pytest.raises(fptq.CalibrationError, match="longer than the model allows"):
        fptq.compile(llama, fptq.RandomTokens(), num_samples=1, seq_len=257, progress=False)
    with pytest.raises(fptq.CalibrationError, match="exceed the model's 256"):
        fptq.compile(llama, torch.zeros(1, 300, dtype=torch.int64), progress=False)


def test_ignore_pattern_that_matches_nothing(llama, token_ids):
    config = fptq.CompileConfig(ignore=("model.layers.*.mlp.gate_prj",))
    with pytest.raises(fptq.ConfigError, match=r"gate_prj.*matches no linear"):
        fptq.compile(llama, token_ids, config, progress=False)


def test_not_a_module():
    with pytest.raises(fptq.ConfigError, match=r"torch\.nn\.Module"):
        fptq.compile("gpt2", torch.zeros(1, 4, dtype=torch.int64), progress=False)  # type: ignore[arg-type]


def test_untied_model_compiles_too(token_ids):
    compiled = fptq.compile(tiny_llama(tie=False), token_ids, progress=False)
    assert len(compiled.plan.layers) == 14


def test_capture_with_cache_matches_the_eager_model(llama):
    from fptq_compile.capture import capture

    captured = capture(llama)
    sequence = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = llama(sequence).logits
        torch.testing.assert_close(captured.logits(sequence), reference)
        torch.testing.assert_close(captured.logits(sequence[:1, :1]), reference[:1, :1])  # one token, empty cache
        logits, past = captured.graph_module(sequence[:, :6], captured.kv_layout.empty(2))
        logits, past = captured.graph_module(sequence[:, 6:], past)
    torch.testing.assert_close(logits, reference[:, 6:], rtol=1e-5, atol=1e-5)
    # Captured without the identities the trace records (remove_identity_ops): the cache's
    # empty starting tensors and their concatenations, full slices, same-dtype casts.
    targets = [node.target for node in captured.graph_module.graph.nodes]
    aten = torch.ops.aten
    assert aten.lift_fresh_copy.default not in targets and aten.alias.default not in targets
    # Per layer: keys and values onto the cache, q's and k's rotated halves; once: the rotary angles.
    assert targets.count(aten.cat.default) == 2 * 4 + 1


def test_graph_without_linear_sites():
    from fptq_compile.capture import select_linears

    with pytest.raises(fptq.UnsupportedGraphError, match=r"no aten\.linear"):
        select_linears((), fptq.CompileConfig())
