"""Decoder blocks: found, captured once, rebound to every block, run one after another."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_DECODER, tiny_llama

import fptq_compile as fptq
from fptq_compile.blocks import (
    capture_block,
    check_blocks_share_inputs,
    find_blocks,
    first_block_inputs,
    run_block,
)
from fptq_compile.errors import UnsupportedGraphError


def test_blocks_are_found_by_structure():
    model = tiny_llama(layers=3)
    blocks = find_blocks(model)
    assert blocks.path == "model.layers" and len(blocks) == 3
    with pytest.raises(UnsupportedGraphError, match="no list of repeated blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_one_captured_block_rebound_to_each_block_reproduces_the_model(token_ids):
    model = tiny_llama(layers=3)
    blocks = find_blocks(model)
    batches = list(token_ids.split(2))
    calls = first_block_inputs(model, blocks, batches)
    assert len(calls) == len(batches)
    graph = capture_block(blocks, calls[0])
    paths = [graph.module_path(blocks, 1, site) for site in graph.linears]
    assert paths == [
        f"model.layers.1.{name}"
        for name in (
            *("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            *("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        )
    ]
    bound = [graph.bind(layer) for layer in blocks.layers]
    for call, batch in zip(calls, batches, strict=True):
        hidden = call[0][0]
        for block in bound:
            hidden = run_block(block, call, hidden)
        with torch.no_grad():
            expected = model.model(input_ids=batch, use_cache=False).last_hidden_state
        assert torch.allclose(model.model.norm(hidden), expected, atol=1e-5)
    # Binding copies the graph: editing one block's graph leaves the others alone.
    assert bound[0].graph is not bound[1].graph


def test_blocks_given_other_inputs_are_refused(token_ids):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**TINY_DECODER, head_dim=16, sliding_window=8)
    model = Gemma2ForCausalLM(config).eval()
    with pytest.raises(UnsupportedGraphError, match=r"model\.layers\.1 is called with other inputs"):
        check_blocks_share_inputs(model, find_blocks(model), token_ids[:1])
    check_blocks_share_inputs(tiny_llama(), find_blocks(tiny_llama()), token_ids[:1])


def _decisions(plan):
    return [(g.input_node, g.linears, g.activation.kind, g.fold) for g in plan.groups]


@pytest.mark.parametrize("rounding", [fptq.WeightRounding.NEAREST, fptq.WeightRounding.GPTQ])
def test_calibrating_block_by_block_gives_the_whole_model_plan_and_weights(rounding, token_ids):
    model = tiny_llama(layers=3)
    # A 35 dB budget makes this model's plan mix static, LAE + static and dynamic groups.
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32, rounding=rounding),
        activations=fptq.ActivationConfig(min_sqnr_db=35.0),
    )
    whole = fptq.compile(model, token_ids, config, progress=False)
    by_block = fptq.compile(model, token_ids, dataclasses.replace(config, calibrate_by_block=True), progress=False)
    assert "measure_activation_error" not in by_block.report.seconds_per_step
    assert _decisions(by_block.plan) == _decisions(whole.plan)
    assert len({g.activation.kind for g in whole.plan.groups}) == 3
    for group, other in zip(by_block.plan.groups, whole.plan.groups, strict=True):
        for mine, theirs in ((group.activation.scale, other.activation.scale), (group.lae_scale, other.lae_scale)):
            assert (mine is None and theirs is None) or mine == pytest.approx(theirs, rel=1e-5)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(by_block(ids), whole(ids), atol=1e-4)


def test_block_by_block_calibration_in_bfloat16_gives_the_whole_model_plan(token_ids):
    model = tiny_llama(layers=3)
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32, rounding=fptq.WeightRounding.NEAREST),
        activations=fptq.ActivationConfig(min_sqnr_db=35.0),
        calibration_dtype=fptq.CalibrationDtype.BFLOAT16,
    )
    whole = fptq.analyze(model, token_ids, config, progress=False)
    by_block = fptq.analyze(model, token_ids, dataclasses.replace(config, calibrate_by_block=True), progress=False)
    assert _decisions(by_block.plan) == _decisions(whole.plan)
    for node, stats in whole.stats.per_linear.items():
        # The two graphs' attention kernels round apart by a few bfloat16 steps (2^-8 each);
        # in float32 they agree to 1e-5 (the test above).
        assert torch.allclose(by_block.stats[node].channel_absmax, stats.channel_absmax, rtol=2**-5)
    # The blocks ran in bfloat16: what each o_proj reads, attention's output, holds bfloat16 values.
    for site in whole.captured.linears:
        if site.module_path.endswith("o_proj"):
            absmax = by_block.stats[site.node].channel_absmax
            assert torch.equal(absmax.bfloat16().float(), absmax)


def test_gpt2_conv1d_blocks_compile_block_by_block_as_the_whole_model(token_ids):
    """GPT-2's Conv1D matmuls become linears in each bound block, as capture() rewrites the
    whole graph's, each reading its own block's transposed weight."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    compile_config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32))
    whole = fptq.compile(model, token_ids, compile_config, progress=False)
    by_block = fptq.compile(
        model, token_ids, dataclasses.replace(compile_config, calibrate_by_block=True), progress=False
    )
    assert len(whole.plan.layers) == 8 and _decisions(by_block.plan) == _decisions(whole.plan)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(by_block(ids), whole(ids), atol=1e-4)


def test_block_by_block_calibration_needs_a_causal_lm():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    config = fptq.CompileConfig(include=("*",), calibrate_by_block=True)
    with pytest.raises(fptq.ConfigError, match="calibrate_by_block"):
        fptq.compile(net, [torch.randn(2, 8)], config, progress=False)
