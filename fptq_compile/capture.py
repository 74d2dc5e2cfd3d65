"""Capture a causal LM as a ``torch.export`` graph and find its linear layers.

``capture`` exports ``(input_ids, past) -> (logits, present)`` (non-strict,
dynamic batch, sequence and cache length) and returns the unlifted ``GraphModule``: parameters are attributes
read by ``get_attr`` nodes and shared with the original model, so passes must never
edit them in place (they register new tensors instead).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from fptq_compile.config import CompileConfig
from fptq_compile.errors import ConfigError, UnsupportedGraphError
from fptq_compile.graph_utils import fetch_tensor, retarget_devices
from fptq_compile.plan import SkippedLayer

# Attribute under which the capture wrapper holds the user's model; stripped from
# module paths so they read as ``model.named_modules()`` names them.
_WRAPPED = "causal_lm"
# Export with batch >= 2: a batch of 1 would be specialized (0/1 specialization).
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 16, 4


@dataclass(frozen=True)
class KVCacheLayout:
    """Shape of the key/value cache the captured graph takes and returns, per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    """Positions a sliding-window layer attends to, when the model has such layers. The
    cache still keeps every position (the attention mask applies the window)."""

    @classmethod
    def from_config(cls, config: Any) -> KVCacheLayout:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types and "sliding_attention" not in layer_types:
            window = None
        return cls(int(config.num_hidden_layers), int(kv_heads), int(head_dim), int(window) if window else None)

    def empty(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A cache holding no position yet: ``[batch, kv_heads, 0, head_dim]`` per layer."""
        shape = (batch_size, self.num_kv_heads, 0, self.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.num_layers)]


KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalLMWithCache(nn.Module):
    """``(input_ids, past) -> (logits, present)`` around a Hugging Face causal LM.

    The cache is a plain list of ``(key, value)`` tensors per layer, so the graph's inputs
    and outputs are tensors a runtime can feed back. Positions continue from the cache
    length and attention is causal: the rows of a batch are unpadded sequences of one
    length. (No attention-mask input: torch.export would tie its length to past + sequence
    under its size >= 2 assumption and refuse 1-token prefills.)
    """

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        setattr(self, _WRAPPED, causal_lm)

    def forward(self, input_ids: torch.Tensor, past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        from transformers import DynamicCache

        causal_lm = getattr(self, _WRAPPED)
        cache = DynamicCache()
        for layer, (key, value) in enumerate(past_key_values):
            cache.update(key, value, layer)
        # Positions and the causal mask follow from the cache length (no padding).
        output = causal_lm(input_ids=input_ids, past_key_values=cache, use_cache=True)
        present = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        return output.logits, present


def cache_signature(kv_layout: KVCacheLayout, vocab_size: int = 2) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example inputs and dynamic shapes of ``(input_ids, past)``, for torch.export and torch.onnx.

    Batch, sequence (>= 1) and past length (>= 0, an empty cache included) are dynamic,
    without upper bounds: past + sequence is what the model limits, and Dims cannot say so.
    """
    batch, past = Dim("batch", min=1), Dim("past_sequence", min=0)
    dynamic_shapes = (
        {0: batch, 1: Dim("sequence", min=1)},
        [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(kv_layout.num_layers)],
    )
    input_ids = torch.randint(0, vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE))
    # Distinct tensors for every key and value: aliased example inputs would be traced as one.
    shape = (_EXAMPLE_BATCH, kv_layout.num_kv_heads, _EXAMPLE_PAST, kv_layout.head_dim)
    past_key_values = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(kv_layout.num_layers)]
    return (input_ids, past_key_values), dynamic_shapes


def logits(graph_module: fx.GraphModule, kv_layout: KVCacheLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """Run a captured graph on whole sequences (empty cache, no padding): the logits."""
    output: torch.Tensor = graph_module(input_ids, kv_layout.empty(input_ids.shape[0]))[0]
    return output


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
class GraphSignature:
    """How a captured graph is called: example positional and keyword inputs, and their
    dynamic shapes as ``torch.export`` spells them (re-exports for saving and ONNX use it)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic_shapes: Any = None


@dataclass(frozen=True)
class CapturedModel:
    """A captured graph and its linears.

    A Hugging Face causal LM is captured as ``(input_ids, past) -> (logits, present)``
    (``kv_layout`` set); any other module, exported program or graph module keeps its own
    inputs and outputs (``kv_layout`` is None).
    """

    graph_module: fx.GraphModule
    linears: tuple[LinearSite, ...]
    kv_layout: KVCacheLayout | None
    max_sequence_length: int | None
    vocab_size: int | None
    unsupported: tuple[SkippedLayer, ...] = ()
    """Matmuls reading a parameter in a form no pass quantizes, each with its reason (kept float)."""
    signature: GraphSignature | None = None
    route: str = ""
    """How a causal LM's graph was captured: two blocks traced and the others repeated, or
    the whole model traced and why ("" for any other graph)."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.kv_layout is None:
            raise UnsupportedGraphError("this graph is not a causal LM with a key/value cache: it has no logits")
        return logits(self.graph_module, self.kv_layout, input_ids)

    def run(self, batch: Any, module: fx.GraphModule | None = None) -> Any:
        """Run one calibration batch through the graph, or through ``module`` called as the
        graph is (e.g. :func:`~fptq_compile.graph_utils.probes_only` of it): token ids for a
        causal LM (with an empty cache); for any other graph its inputs, as a tuple
        (positional), a dict (keyword) or a single tensor."""
        module = self.graph_module if module is None else module
        if self.kv_layout is not None:
            return module(batch, self.kv_layout.empty(batch.shape[0]))
        args, kwargs = split_inputs(batch)
        return module(*args, **kwargs)


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A module's inputs as ``(args, kwargs)``: a tuple is positional, a dict is keyword,
    anything else (a tensor) the one positional input."""
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, dict):
        return (), inputs
    return (inputs,), {}


def capture(model: nn.Module) -> CapturedModel:
    """Export a Hugging Face causal LM as a graph with a key/value cache.

    Inputs ``input_ids [batch, seq]`` and the past cache; outputs the logits and the
    present cache (past + seq positions). Batch, sequence and past length are
    dynamic (the past may be empty), so one graph serves calibration, evaluation,
    prefill and token-by-token decoding.
    """
    if not any(parameter.dim() == 2 for parameter in model.parameters()):
        raise UnsupportedGraphError(f"{type(model).__name__} has no linear layer (no 2-D weight): nothing to quantize")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise UnsupportedGraphError(
            f"{type(model).__name__} has no Hugging Face config: not a supported causal LM "
            "(pass example_inputs to compile any other module)"
        )
    vocab_size, max_sequence_length = model_limits(model)
    kv_layout = KVCacheLayout.from_config(config)
    example_inputs, dynamic_shapes = cache_signature(kv_layout, int(vocab_size or 2))
    model.eval()
    signature = GraphSignature(example_inputs, {}, dynamic_shapes)
    if all(parameter.device.type == "meta" for parameter in model.parameters()):
        # An empty model (the structure of an offloaded one) is traced on meta inputs; the
        # graph then runs on CPU tensors.
        meta_inputs = pytree.tree_map(lambda tensor: tensor.to("meta"), example_inputs)
        meta_signature = GraphSignature(meta_inputs, {}, dynamic_shapes)
        graph_module = export_unlifted(CausalLMWithCache(model), meta_signature, model)
        retarget_devices(graph_module, "meta", "cpu")
        route = "whole model traced (its weights are not in memory)"
    else:
        graph_module, route = _capture_in_memory(model, kv_layout, int(vocab_size or 2), signature)
    return _captured(graph_module, kv_layout, max_sequence_length, vocab_size, signature, route)


def _capture_in_memory(
    model: nn.Module, kv_layout: KVCacheLayout, vocab_size: int, signature: GraphSignature
) -> tuple[fx.GraphModule, str]:
    """The graph of a causal LM whose weights are in memory, and how it was captured: two
    blocks traced and the others repeated where the blocks allow it (:mod:`~fptq_compile.repeat_blocks`),
    else the whole model traced."""
    from fptq_compile.repeat_blocks import TRACED_BLOCKS, NotRepeatable, capture_repeated  # it imports this module

    try:
        graph_module = capture_repeated(model, kv_layout, vocab_size)
    except NotRepeatable as reason:
        return export_unlifted(CausalLMWithCache(model), signature, model), f"whole model traced ({reason})"
    return graph_module, f"{TRACED_BLOCKS} of {kv_layout.num_layers} blocks traced, the others repeated"


def graph_attribute(module_path: str) -> str:
    """The graph attribute under which a captured causal LM reads the tensor the model calls
    ``module_path`` (``model.norm.weight``)."""
    return f"{_WRAPPED}.{module_path}"


def capture_graph(
    model: nn.Module | torch.export.ExportedProgram, example_inputs: Any, dynamic_shapes: Any = None
) -> CapturedModel:
    """Capture any module, exported program or graph module with its own inputs and outputs.

    ``example_inputs`` is how the model is called (a tuple of positional inputs, a dict of
    keyword inputs, or one tensor); ``dynamic_shapes`` as ``torch.export`` takes them
    (default: every dimension ``Dim.AUTO``, dynamic unless the code fixes it). An exported
    program's graph is taken as it is; a graph module is copied (its tensors are shared,
    never edited).
    """
    args, kwargs = split_inputs(example_inputs)
    if dynamic_shapes is None:
        dynamic_shapes = auto_dynamic_shapes(args, kwargs)
    signature = GraphSignature(args, kwargs, dynamic_shapes)
    if isinstance(model, torch.export.ExportedProgram):
        graph_module = model.module()
    elif isinstance(model, fx.GraphModule):
        graph_module = fx.GraphModule(model, copy.deepcopy(model.graph))
    elif isinstance(model, nn.Module):
        model.eval()
        graph_module = export_unlifted(model, signature, model)
    else:
        raise UnsupportedGraphError(
            f"cannot capture a {type(model).__name__}: pass an nn.Module, a torch.export.ExportedProgram "
            "or a torch.fx.GraphModule"
        )
    return _captured(graph_module, None, None, None, signature)


def auto_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` for every dimension of every tensor input, in the inputs' structure
    (by name for keyword inputs)."""

    def auto(value: Any) -> Any:
        return {dim: Dim.AUTO for dim in range(value.dim())} if isinstance(value, torch.Tensor) else None

    if args and kwargs:
        raise UnsupportedGraphError("give dynamic_shapes for inputs that mix positional and keyword arguments")
    return pytree.tree_map(auto, kwargs if kwargs else args)


def export_unlifted(module: nn.Module, signature: GraphSignature, model: nn.Module) -> fx.GraphModule:
    """``torch.export`` (non-strict) of ``module``, unlifted; errors name ``model``."""
    try:
        with torch.no_grad():
            exported = torch.export.export(
                module, signature.args, signature.kwargs, dynamic_shapes=signature.dynamic_shapes, strict=False
            )
    except Exception as error:  # torch.export raises many unrelated types; name the cause
        raise UnsupportedGraphError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {error}"
        ) from error
    return exported.module()


def _captured(
    graph_module: fx.GraphModule,
    kv_layout: KVCacheLayout | None,
    max_sequence_length: int | None,
    vocab_size: int | None,
    signature: GraphSignature,
    route: str = "",
) -> CapturedModel:
    # Imported here: the passes package imports this module.
    from fptq_compile.passes.canonicalize_linears import canonicalize_linears, unsupported_matmuls
    from fptq_compile.passes.remove_identity_ops import remove_identity_ops

    # Every later trace of the graph (saving, ONNX) walks its nodes: the identities go first.
    remove_identity_ops(graph_module)
    # GPT-2's Conv1D and other x @ W matmuls become aten.linear, the form every pass reads.
    canonicalize_linears(graph_module)
    unsupported = tuple(
        SkippedLayer(node.name, module_path_of(node), reason) for node, reason in unsupported_matmuls(graph_module)
    )
    linears = find_linear_sites(graph_module)
    return CapturedModel(
        graph_module, linears, kv_layout, max_sequence_length, vocab_size, unsupported, signature, route
    )


def model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """The vocabulary size and the longest sequence a Hugging Face model's config allows."""
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)


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
    for name, patterns in (("ignore", config.ignore), ("int8_weight_only", config.int8_weight_only)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(site.module_path, pattern) for site in linears):
                raise ConfigError(
                    f"{name} pattern {pattern!r} matches no linear layer (e.g. {linears[0].module_path!r})"
                )
    selected: list[LinearSite] = []
    skipped: list[SkippedLayer] = []
    for site in linears:
        ignored_by = next((p for p in config.ignore if fnmatch.fnmatchcase(site.module_path, p)), None)
        if ignored_by is not None:
            skipped.append(SkippedLayer(site.node, site.module_path, f"matches ignore pattern {ignored_by!r}"))
        elif config.is_int8_weight_only(site.module_path):
            selected.append(site)
        elif not any(fnmatch.fnmatchcase(site.module_path, p) for p in config.include):
            reason = f"outside the include patterns {list(config.include)} (kept float)"
            skipped.append(SkippedLayer(site.node, site.module_path, reason))
        else:
            selected.append(site)
    if not selected:
        found = ", ".join(site.module_path or site.node for site in linears[:4])
        raise ConfigError(
            f"no linear layer to quantize: none of the model's {len(linears)} linears ({found}) matches the "
            f"include patterns {list(config.include)} (by default, linears inside numbered decoder blocks)"
        )
    return tuple(selected), tuple(skipped)
