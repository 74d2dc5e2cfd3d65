"""Compiling what is not a Hugging Face causal LM: a user's module with dict inputs and its own
norm in plain torch ops, an exported program, a graph module from one, and a BERT encoder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.passes import fold_log_equalization
from fptq_compile.plan import ActivationClass, FoldKind


class OffsetRMSNorm(nn.Module):
    """Gemma's norm written by hand: ``x / rms(x) * (1 + w)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class Block(nn.Module):
    def __init__(self, size: int, norm_feeds_residual: bool) -> None:
        super().__init__()
        self.norm = OffsetRMSNorm(size)
        self.up = nn.Linear(size, 2 * size)
        self.down = nn.Linear(2 * size, size)
        self.norm_feeds_residual = norm_feeds_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(x)
        # A post-norm style residual reads the norm output too: that fold must be refused.
        residual = normalized if self.norm_feeds_residual else x
        return residual + self.down(torch.relu(self.up(normalized)))


class UserNet(nn.Module):
    """Dict inputs, dict output; the second block's norm also feeds its residual."""

    def __init__(self, size: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(size, False), Block(size, True)])
        self.head = nn.Linear(size, 8)

    def forward(self, features: torch.Tensor, gain: torch.Tensor) -> dict[str, torch.Tensor]:
        x = features * gain
        for block in self.layers:
            x = block(x)
        return {"scores": self.head(x)}


def _batch(seed: int, batch: int = 2, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, 64, generator=generator) * torch.linspace(0.1, 20, 64)
    return {"features": features, "gain": torch.full((batch, length, 1), 1.5)}


@pytest.fixture
def user_net() -> UserNet:
    torch.manual_seed(0)
    return UserNet().eval()


def _lae_config(**weights) -> fptq.CompileConfig:
    """Every group in the LAE range, so every norm that can take a fold does."""
    activations = fptq.ActivationConfig(policy=fptq.ActivationPolicy.FPTQ, static_threshold=1e-3, dynamic_threshold=1e6)
    weights = {"group_size": 32, "rounding": fptq.WeightRounding.NEAREST} | weights
    return fptq.CompileConfig(weights=fptq.WeightConfig(**weights), activations=activations)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_a_user_module_with_dict_inputs_folds_its_own_norm_exactly_or_says_why_not(user_net):
    batches = [_batch(seed) for seed in range(3)]
    weight_before = user_net.layers[0].norm.weight.detach().clone()
    folded = fptq.compile(user_net, batches, _lae_config(), passes=[fold_log_equalization], progress=False)
    node_of = {layer.module_path: layer.node for layer in folded.plan.layers}
    group_of = {name: group for group in folded.plan.groups for name in group.linears}
    first, second = group_of[node_of["layers.0.up"]], group_of[node_of["layers.1.up"]]
    assert first.activation.kind is ActivationClass.LAE_STATIC and first.fold is not None
    assert (first.fold.kind, first.fold.module_path, first.fold.gain_offset) == (FoldKind.RMS_NORM, "layers.0.norm", 1)
    assert second.activation.kind is ActivationClass.DYNAMIC and "also feeds" in second.reason
    test = _batch(7)
    with torch.no_grad():
        assert _relative(folded(**test)["scores"], user_net(**test)["scores"]) < 1e-5
    # The graph keeps its (1 + w) form with w' such that 1 + w' = (1 + w) / s; the user's w is untouched.
    assert first.lae_scale is not None
    buffers = folded.graph_module.named_buffers()
    (rewritten,) = [tensor for name, tensor in buffers if name.startswith("fptq_lae_") and tensor.dim() == 1]
    expected = (1 + weight_before) / torch.tensor(first.lae_scale)
    assert torch.allclose(1 + rewritten, expected, rtol=1e-6)
    assert torch.equal(user_net.layers[0].norm.weight, weight_before)


def test_a_user_module_compiles_to_w4a8_and_its_onnx_matches(user_net, tmp_path):
    batches = [_batch(seed) for seed in range(3)]
    compiled = fptq.compile(user_net, batches, _lae_config(), progress=False)
    assert {layer.module_path for layer in compiled.plan.layers} == {
        f"layers.{i}.{name}" for i in range(2) for name in ("up", "down")
    }
    assert [(skip.module_path, "include" in skip.reason) for skip in compiled.plan.skipped] == [("head", True)]
    test = _batch(8, batch=3, length=7)  # another batch size and length: the shapes stayed dynamic
    reference = compiled(**test)["scores"]
    assert _relative(reference, user_net(**test)["scores"]) < 0.05
    export_onnx(compiled, tmp_path / "net.onnx", OnnxLayout.QDQ)
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["features", "gain"]
    (scores,) = session.run(None, {name: value.numpy() for name, value in test.items()})
    # Measured 1.4e-3: an int8 rounding flip on a value at a rounding boundary (ORT and torch
    # differ in the last float bit) moves a score by ~1e-3; a wrong lowering by far more.
    assert _relative(torch.from_numpy(scores), reference) < 5e-3


def test_save_and_load_keep_a_user_module_and_its_example_inputs(user_net, tmp_path):
    batches = [_batch(seed) for seed in range(2)]
    compiled = fptq.compile(user_net, batches, _lae_config(), progress=False)
    fptq.save_compiled(compiled, tmp_path)
    loaded = fptq.load_compiled(tmp_path)
    assert loaded.kv_layout is None and loaded.signature is not None
    test = _batch(9)
    assert torch.equal(loaded(**test)["scores"], compiled(**test)["scores"])


def test_an_exported_program_and_its_graph_module_compile_like_the_module(user_net):
    batches = [_batch(seed) for seed in range(2)]
    program = torch.export.export(user_net, (), batches[0], strict=False)
    graph_module = program.module()
    code_before = graph_module.code
    plans = [
        fptq.compile(model, batches, _lae_config(), progress=False).plan for model in (user_net, program, graph_module)
    ]
    summaries = [plan.summary() for plan in plans]
    assert summaries[0] == summaries[1] == summaries[2]
    assert [g.activation.kind for g in plans[0].groups] == [g.activation.kind for g in plans[2].groups]
    assert graph_module.code == code_before  # the user's graph module is copied, not edited


def test_bad_calibration_for_a_module_with_its_own_inputs():
    with pytest.raises(fptq.CalibrationError, match="list of batches"):
        fptq.compile(UserNet(), torch.zeros(2, 8), example_inputs=_batch(0), progress=False)
    with pytest.raises(fptq.CalibrationError, match="batch 1 is a str"):
        fptq.compile(UserNet(), [_batch(0), "text"], progress=False, example_inputs=_batch(0))


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_a_bert_encoder_compiles_its_post_norms_are_refused_and_onnx_matches(tmp_path):
    bert = _bert()
    generator = torch.Generator().manual_seed(0)

    def batch(size: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (size, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones(size, length, dtype=torch.long)}

    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32, rounding=fptq.WeightRounding.NEAREST))
    compiled = fptq.compile(bert, [batch(2, 16) for _ in range(3)], config, progress=False)
    paths = {layer.module_path for layer in compiled.plan.layers}
    per_layer = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    per_layer += ("intermediate.dense", "output.dense")
    assert paths == {f"encoder.layer.{i}.{name}" for i in range(2) for name in per_layer}
    assert [skip.module_path for skip in compiled.plan.skipped] == ["pooler.dense"]
    # Post-norm: every LayerNorm output also feeds the next residual, so no norm takes a fold.
    assert all(group.fold is None for group in compiled.plan.groups)
    export_onnx(compiled, tmp_path / "bert.onnx", OnnxLayout.QDQ)
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    test = batch(3, 11)
    hidden = session.run(None, {name: value.numpy() for name, value in test.items()})[0]
    reference = compiled(**test).last_hidden_state
    assert _relative(torch.from_numpy(np.asarray(hidden)), reference) < 1e-3
