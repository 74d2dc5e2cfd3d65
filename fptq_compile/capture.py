"""Capture a causal LM as a ``torch.export`` graph and find its linear layers.

``capture`` exports ``forward(input_ids) -> logits`` (non-strict, dynamic batch and
sequence length) and returns the unlifted ``GraphModule``: parameters are attributes
read by ``get_attr`` nodes and shared with the original model, so passes must never
edit them in place (they register new tensors instead).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim

from fptq_compile.config import CompileConfig
from fptq_compile.errors import ConfigError, UnsupportedGraphError
from fptq_compile.graph_utils import fetch_tensor
from fptq_compile.plan import SkippedLayer

# Attribute under which the capture wrapper holds the user's model; stripped from
# module paths so they read as ``model.named_modules()`` names them.
_WRAPPED = "causal_lm"
# Export with batch >= 2: a batch of 1 would be specialized (0/1 specialization).
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE = 2, 16


class _LogitsOnly(nn.Module):
    """``forward(input_ids) -> logits`` around a Hugging Face causal LM, without KV cache."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        setattr(self, _WRAPPED, causal_lm)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, _WRAPPED)(input_ids=input_ids, use_cache=False).logits


@dataclass(frozen=True)
class LinearSite:
    """One ``aten.linear`` node of a captured graph and what it reads."""

    node: str
    module_path: str
    weight_target: str
    input_node: str
    in_features: int
    out_features: int
    has_bias: bool


@dataclass(frozen=True)
class CapturedModel:
    graph_module: fx.GraphModule
    linears: tuple[LinearSite, ...]
    max_sequence_length: int | None
    vocab_size: int | None


def capture(model: nn.Module) -> CapturedModel:
    """Export a Hugging Face causal LM as a graph of ``input_ids -> logits``."""
    config = getattr(model, "config", None)
    max_sequence_length = getattr(config, "max_position_embeddings", None)
    vocab_size = getattr(config, "vocab_size", None)
    max_sequence = int(max_sequence_length) if max_sequence_length else 8192
    example = torch.randint(0, int(vocab_size or 2), (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE))
    dynamic_shapes = {"input_ids": {0: Dim("batch", min=1, max=1024), 1: Dim("sequence", min=1, max=max_sequence)}}
    model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(_LogitsOnly(model), (example,), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # torch.export raises many unrelated types; name the cause
        raise UnsupportedGraphError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {error}"
        ) from error
    graph_module = exported.module()
    linears = find_linear_sites(graph_module)
    return CapturedModel(graph_module, linears, max_sequence_length, vocab_size)


def module_path_of(node: fx.Node) -> str:
    """The path of the module that produced ``node``, as the user's model names it."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    prefix = _WRAPPED + "."
    return path[len(prefix) :] if path.startswith(prefix) else path


def find_linear_sites(graph_module: fx.GraphModule) -> tuple[LinearSite, ...]:
    """Every ``aten.linear`` whose weight is a parameter of the graph module."""
    sites = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        activation, weight = node.args[0], node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or not isinstance(activation, fx.Node):
            continue
        out_features, in_features = fetch_tensor(graph_module, str(weight.target)).shape
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        sites.append(
            LinearSite(
                node=node.name,
                module_path=module_path_of(node),
                weight_target=str(weight.target),
                input_node=activation.name,
                in_features=int(in_features),
                out_features=int(out_features),
                has_bias=bias is not None,
            )
        )
    return tuple(sites)


def select_linears(
    linears: tuple[LinearSite, ...], config: CompileConfig
) -> tuple[tuple[LinearSite, ...], tuple[SkippedLayer, ...]]:
    """Split linears into those to quantize and those kept float, each with its reason."""
    if not linears:
        raise UnsupportedGraphError(
            "the captured graph has no aten.linear with a parameter weight: nothing to quantize"
        )
    for pattern in config.ignore:
        if not any(fnmatch.fnmatchcase(site.module_path, pattern) for site in linears):
            raise ConfigError(f"ignore pattern {pattern!r} matches no linear layer (e.g. {linears[0].module_path!r})")
    selected: list[LinearSite] = []
    skipped: list[SkippedLayer] = []
    for site in linears:
        ignored_by = next((p for p in config.ignore if fnmatch.fnmatchcase(site.module_path, p)), None)
        if ignored_by is not None:
            skipped.append(SkippedLayer(site.node, site.module_path, f"matches ignore pattern {ignored_by!r}"))
        elif not any(fnmatch.fnmatchcase(site.module_path, p) for p in config.include):
            reason = f"outside the include patterns {list(config.include)} (kept float)"
            skipped.append(SkippedLayer(site.node, site.module_path, reason))
        else:
            selected.append(site)
    if not selected:
        raise ConfigError(f"no linear layer matches the include patterns {list(config.include)}")
    return tuple(selected), tuple(skipped)
