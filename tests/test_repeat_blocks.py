"""Capture by repetition: two blocks traced, the others written in as copies of the second.

The graph must be the model's (prefill and cached step, every family), have the ops a
whole-model trace has, leave the model unchanged, check its inputs for every block, and
give way to a whole-model trace where blocks differ.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_llama
from test_families import FAMILIES
from torch import fx, nn

import fptq_compile as fptq
import fptq_compile.repeat_blocks as repeat_blocks
from fptq_compile.capture import capture
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.runtime import OrtCausalLM

_LAYERS = 4
_REFUSED = {"gemma2": "several layer types"}
"""Families whose blocks are not repeated (Gemma-2 alternates sliding and full attention)."""


def _deeper(name: str) -> nn.Module:
    """The family's tiny model with four blocks (its config's layer types rebuilt for them)."""
    config = FAMILIES[name].config()
    values = config.to_dict()
    values.pop("layer_types", None)
    values["n_layer" if "n_layer" in values else "num_hidden_layers"] = _LAYERS
    torch.manual_seed(0)
    return FAMILIES[name].model(type(config)(**values)).eval()


def _traced_whole(model: nn.Module, monkeypatch: pytest.MonkeyPatch):
    """The model captured by a whole-model trace (repetition refused)."""

    def refuse(*args: object) -> fx.GraphModule:
        raise repeat_blocks.NotRepeatable("refused by the test")

    with monkeypatch.context() as patch:
        patch.setattr(repeat_blocks, "capture_repeated", refuse)
        return capture(model)


def _ops(graph_module: fx.GraphModule) -> Counter[str]:
    return Counter(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_repeated_graph_is_the_model_and_the_whole_trace(name, monkeypatch):
    model = _deeper(name)
    captured = capture(model)
    if name in _REFUSED:
        assert captured.route.startswith("whole model traced") and _REFUSED[name] in captured.route
        return
    assert captured.route == f"2 of {_LAYERS} blocks traced, the others repeated"
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        assert _relative(captured.logits(ids), expected) < 1e-5
        _, present = captured.graph_module(ids[:, :-1], captured.kv_layout.empty(2))
        step, present = captured.graph_module(ids[:, -1:], present)
    assert _relative(step[:, -1], expected[:, -1]) < 1e-5
    assert len(present) == _LAYERS and all(key.shape[2] == 7 for key, _ in present)
    whole = _traced_whole(model, monkeypatch)
    assert "refused by the test" in whole.route
    # The same ops (the traced guard function aside, replaced by CacheGuards) and linears.
    assert _ops(captured.graph_module) == _ops(whole.graph_module)
    assert [site.module_path for site in captured.linears] == [site.module_path for site in whole.linears]
    assert [site.weight_target for site in captured.linears] == [site.weight_target for site in whole.linears]


def test_the_model_is_left_as_it_was():
    model = _deeper("qwen2")
    layers, layer_types = model.model.layers, list(model.config.layer_types)
    assert capture(model).route.startswith("2 of 4")
    assert model.model.layers is layers and len(layers) == _LAYERS
    assert model.config.num_hidden_layers == _LAYERS and model.config.layer_types == layer_types


def test_a_block_running_other_code_is_traced_with_the_whole_model():
    model = tiny_llama(layers=_LAYERS)
    # The same tensors, another activation: only the comparison with the model can tell.
    model.model.layers[3].mlp.act_fn = nn.GELU()
    captured = capture(model)
    assert captured.route.startswith("whole model traced (the repeated graph's output 0 differs")
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert _relative(captured.logits(ids), model(ids).logits) < 1e-5


def test_two_blocks_or_weights_on_meta_are_traced_whole():
    assert "nothing to repeat" in capture(tiny_llama(layers=2)).route
    with init_empty_weights():
        empty = type(tiny_llama(layers=_LAYERS))(tiny_llama(layers=_LAYERS).config)
    assert capture(empty).route == "whole model traced (its weights are not in memory)"


def test_every_blocks_cache_input_is_checked():
    captured = capture(tiny_llama(layers=_LAYERS))
    ids = torch.randint(0, 128, (2, 3))
    past = captured.kv_layout.empty(2)
    wrong_batch = [*past[:2], (past[2][0], torch.zeros(3, *past[2][1].shape[1:])), *past[3:]]
    with pytest.raises(RuntimeError, match=r"past_key_values\[2\]\[1\] has batch 3, expected 2"):
        captured.graph_module(ids, wrong_batch)
    longer = torch.zeros(2, captured.kv_layout.num_kv_heads, 1, captured.kv_layout.head_dim)
    wrong_length = [*past[:3], (longer, past[3][1])]
    with pytest.raises(RuntimeError, match=r"past_key_values\[3\]\[0\] has positions 1, expected 0"):
        captured.graph_module(ids, wrong_length)


def test_a_repeated_graph_compiles_and_exports_as_the_traced_one(tmp_path):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    compiled = fptq.compile(tiny_llama(layers=_LAYERS), ids, progress=False)
    assert compiled.report.capture_route.startswith("2 of 4")
    export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.ORT)
    session = OrtCausalLM.load(tmp_path / "model.onnx", exact=True)
    reference = compiled(ids[:2, :24])
    assert _relative(session(ids[:2, :24]), reference) < 1e-3
