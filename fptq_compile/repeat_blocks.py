"""Capture a causal LM by tracing two of its decoder blocks and repeating the second.

``torch.export`` traces every op of every block under symbolic shapes, though the blocks
run one piece of code on their own weights: SmolLM2's 30 blocks are ~11 s of a ~12 s
capture on a 2-core Zen 4. :func:`capture_repeated` traces the model cut down to its first
two blocks (shallow copies: the user's model is not changed), then writes blocks 2..n-1
into that graph as copies of block 1's nodes. Each copy reads its own block's weights and
cache inputs and the previous block's output; what the blocks share (position embeddings,
the mask, sizes) is read as block 1 reads it. Block 1 is the template rather than block 0
because its one input from block 0 names the link from a block to the next.

Before (traced, 2 blocks): ids -> embed -> [block 0] -> [block 1] -> norm -> lm_head
After:                     ids -> embed -> [block 0] -> [block 1] -> [copy 2] ... [copy n-1] -> norm -> lm_head

The graph is the one a whole-model trace gives, up to node names. It must compute what
the model computes: it is run against the model on a prefill after a non-empty cache, every
output compared. Where the blocks are not alike (parameters of other shapes, mixed layer
types, a block reading more of its predecessor than its hidden states), or the comparison
fails, :class:`NotRepeatable` says why and the caller traces the whole model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fptq_compile.blocks import DecoderBlocks, find_blocks, own_tensor
from fptq_compile.capture import (
    CausalLMWithCache,
    GraphSignature,
    KVCacheLayout,
    cache_signature,
    export_unlifted,
    graph_attribute,
)
from fptq_compile.errors import UnsupportedGraphError
from fptq_compile.passes.remove_identity_ops import remove_identity_ops

TRACED_BLOCKS = 2
"""Blocks traced: block 0 after the embeddings, block 1 after a block (the template)."""
_CACHE_PARTS = 2
"""Cache inputs and outputs per block: key and value."""


class NotRepeatable(Exception):
    """Why a model's blocks cannot be captured once and repeated (the whole model is traced)."""


def capture_repeated(model: nn.Module, kv_layout: KVCacheLayout, vocab_size: int) -> fx.GraphModule:
    """The unlifted ``(input_ids, past) -> (logits, present)`` graph of ``model`` from a trace
    of its first two blocks, the others written in as copies of the second (see the module
    docstring). Raises :class:`NotRepeatable` where that graph would not be the model's."""
    blocks = _alike_blocks(model, kv_layout)
    example, dynamic_shapes = cache_signature(dataclasses.replace(kv_layout, num_layers=TRACED_BLOCKS), vocab_size)
    try:
        traced = export_unlifted(
            CausalLMWithCache(_first_blocks(model, blocks)), GraphSignature(example, {}, dynamic_shapes), model
        )
    except UnsupportedGraphError as error:
        raise NotRepeatable(f"the model cut to {TRACED_BLOCKS} blocks does not export ({error})") from error
    # The cache's per-block set-up (concatenation onto an empty tensor) goes: a block is then its own nodes.
    remove_identity_ops(traced)
    _repeat_last_block(traced, blocks, len(blocks))
    _check_matches(traced, model, kv_layout, vocab_size)
    return traced


def _alike_blocks(model: nn.Module, kv_layout: KVCacheLayout) -> DecoderBlocks:
    """The model's blocks, if they can share one traced block: more than two, one per cache
    layer, of one layer type, with parameters and buffers of the same names, shapes and dtypes,
    in memory (the graph is checked against the model)."""
    try:
        blocks = find_blocks(model)
    except UnsupportedGraphError as error:
        raise NotRepeatable(str(error)) from error
    if len(blocks) <= TRACED_BLOCKS or len(blocks) != kv_layout.num_layers:
        raise NotRepeatable(f"{len(blocks)} blocks for {kv_layout.num_layers} cache layers: nothing to repeat")
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise NotRepeatable(f"the blocks are of several layer types ({sorted(set(layer_types))})")
    first = _tensor_layout(blocks.layers[0])
    for index, layer in enumerate(blocks.layers):
        if _tensor_layout(layer) != first:
            raise NotRepeatable(f"block {blocks.block_path(index)} holds other tensors than block 0")
    if any(tensor.device.type == "meta" for tensor in model.parameters()):
        raise NotRepeatable("the weights are not in memory (meta tensors): the graph could not be checked")
    return blocks


def _tensor_layout(block: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    tensors = [*block.named_parameters(), *block.named_buffers()]
    return [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors]


def _first_blocks(model: nn.Module, blocks: DecoderBlocks) -> nn.Module:
    """``model`` with only its first ``TRACED_BLOCKS`` blocks, its config saying so: shallow
    copies of the modules on the way to the block list (every weight shared, none copied)."""
    config: Any = copy.copy(model.config)
    config.num_hidden_layers = TRACED_BLOCKS
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:TRACED_BLOCKS])

    def shallow(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)
        clone._modules = dict(module._modules)
        if getattr(module, "config", None) is model.config:
            clone.config = config
        return clone

    root = parent = shallow(model)
    *owners, name = blocks.path.split(".")
    for owner in owners:
        child = shallow(parent.get_submodule(owner))
        parent._modules[owner] = child
        parent = child
    parent._modules[name] = nn.ModuleList(list(blocks.layers)[:TRACED_BLOCKS])
    return root


@dataclasses.dataclass(frozen=True)
class _TracedBlocks:
    """The two traced blocks' nodes in a graph, and how block 1 connects to the rest."""

    template: list[fx.Node]
    """Block 1's computing nodes, in graph order."""
    attributes: list[fx.Node]
    """Block 1's ``get_attr`` nodes (its weights)."""
    caches: list[fx.Node]
    """Block 1's cache inputs (key, value)."""
    hidden_in: fx.Node
    """Block 0's output, block 1's one input from block 0."""
    hidden_out: fx.Node
    """Block 1's output, read by the nodes after the blocks."""


def _repeat_last_block(graph_module: fx.GraphModule, blocks: DecoderBlocks, count: int) -> None:
    """Write blocks 2..count-1 into the traced graph as copies of block 1 (see the module docstring)."""
    graph = graph_module.graph
    traced = _find_traced_blocks(graph, blocks)
    placeholders = list(graph.find_nodes(op="placeholder"))
    (output,) = graph.find_nodes(op="output")
    flat_outputs = list(output.args[0])
    template = set(traced.template)
    after_blocks = [user for user in traced.hidden_out.users if user not in template and user.op != "output"]
    cache_outputs = flat_outputs[-len(traced.caches) :]  # block 1's present key and value
    if not set(cache_outputs) <= template:
        raise NotRepeatable("the traced graph's last outputs are not block 1's cache")
    last_placeholder, cursor = placeholders[-1], traced.template[-1]
    previous_out = traced.hidden_out
    for index in range(TRACED_BLOCKS, count):
        move = _Retarget(graph_attribute(blocks.block_path(1)), graph_attribute(blocks.block_path(index)))
        copies: dict[fx.Node, fx.Node] = {traced.hidden_in: previous_out}
        for part, cache in enumerate(traced.caches):
            with graph.inserting_after(last_placeholder):
                last_placeholder = graph.placeholder(f"past_key_values_{index}_{part}")
            last_placeholder.meta = copy.copy(cache.meta)
            copies[cache] = last_placeholder
        for attribute in traced.attributes:
            target = move.text(str(attribute.target))
            _register_like(graph_module, str(attribute.target), target, blocks.layers[index], move)
            with graph.inserting_after(attribute):
                copies[attribute] = graph.get_attr(target)
            copies[attribute].meta = copy.copy(attribute.meta)
        for node in traced.template:
            with graph.inserting_after(cursor):
                cursor = graph.node_copy(node, functools.partial(_copy_of, copies))
            cursor.meta["nn_module_stack"] = move.module_stack(node.meta.get("nn_module_stack", {}))
            copies[node] = cursor
        previous_out = copies[traced.hidden_out]
        flat_outputs += [copies[node] for node in cache_outputs]
    for user in after_blocks:
        user.replace_input_with(traced.hidden_out, previous_out)
    output.args = (tuple(flat_outputs),)
    _guard_inputs(graph_module)
    _respecify(graph_module, count)
    graph.lint()
    graph_module.recompile()


def _find_traced_blocks(graph: fx.Graph, blocks: DecoderBlocks) -> _TracedBlocks:
    """Block 1's nodes and links in a graph traced with two blocks; refuses a graph whose
    block 1 reads more of block 0 than one output, or whose blocks differ in length."""
    prefixes = [graph_attribute(blocks.block_path(index)) for index in range(TRACED_BLOCKS)]
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != 1 + TRACED_BLOCKS * _CACHE_PARTS:
        raise NotRepeatable(f"the traced graph has {len(placeholders)} inputs, not ids and a cache per block")
    computing: list[list[fx.Node]] = [[], []]
    attributes: list[list[fx.Node]] = [[], []]
    for node in graph.nodes:
        if node.op == "call_module" and node.target != _GUARDS:
            raise NotRepeatable(f"the traced graph calls a module ({node.target})")
        index = _block_of(node, prefixes)
        if index is not None:
            (attributes if node.op == "get_attr" else computing)[index].append(node)
    caches = [placeholders[1 + _CACHE_PARTS * index : 1 + _CACHE_PARTS * (index + 1)] for index in range(2)]
    template, own = computing[1], {*computing[1], *attributes[1], *caches[1]}
    of_block_0 = {*computing[0], *attributes[0], *caches[0]}
    links = {arg for node in template for arg in node.all_input_nodes if arg in of_block_0}
    if len(links) != 1 or not links <= set(computing[0]):
        raise NotRepeatable(f"block 1 reads {len(links)} values of block 0, not just its output")
    outward = {node for node in template for user in node.users if user not in own and user.op != "output"}
    if len(outward) != 1:
        raise NotRepeatable(f"{len(outward)} of block 1's values are read after it, not just its output")
    (hidden_in,), (hidden_out,) = links, outward
    same_shape = len(computing[0]) == len(template) and computing[0].index(hidden_in) == template.index(hidden_out)
    if not same_shape:
        raise NotRepeatable("blocks 0 and 1 were traced to graphs of different shapes")
    return _TracedBlocks(template, attributes[1], caches[1], hidden_in, hidden_out)


def _copy_of(copies: dict[fx.Node, fx.Node], node: fx.Node) -> fx.Node:
    return copies.get(node, node)


def _block_of(node: fx.Node, prefixes: Sequence[str]) -> int | None:
    """Which traced block a ``get_attr`` or computing node belongs to (None: neither)."""
    if node.op == "get_attr":
        path = str(node.target)
    elif node.op == "call_function" and node.meta.get("nn_module_stack"):
        path = str(list(node.meta["nn_module_stack"].values())[-1][0])
    else:
        return None
    for index, prefix in enumerate(prefixes):
        if path == prefix or path.startswith(prefix + "."):
            return index
    return None


@dataclasses.dataclass(frozen=True)
class _Retarget:
    """Rewrites block 1's attribute and module paths as block ``index``'s."""

    source: str
    destination: str

    def text(self, text: str) -> str:
        return re.sub(re.escape(self.source) + r"(?=\.|$)", self.destination, text, count=1)

    def module_stack(self, stack: dict[str, tuple[str, object]]) -> dict[str, tuple[str, object]]:
        return {self.text(key): (self.text(path), kind) for key, (path, kind) in stack.items()}


def _register_like(graph_module: fx.GraphModule, template: str, target: str, block: nn.Module, move: _Retarget) -> None:
    """Register at ``target`` the tensor of ``block`` that the template's ``template``
    attribute is to block 1, as a parameter or buffer as that one is."""
    relative = move.text(template).removeprefix(move.destination + ".")
    name = relative.rpartition(".")[2]
    tensor = own_tensor(block, relative)
    if tensor is None:
        raise NotRepeatable(f"block 1's graph reads {template}, which is no tensor of a block")
    template_owner_path, _, _ = template.rpartition(".")
    target_owner_path, _, _ = target.rpartition(".")
    template_owner = graph_module.get_submodule(template_owner_path)
    target_owner = _submodule(graph_module, target_owner_path)
    if name in template_owner._parameters:
        parameter = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        target_owner.register_parameter(name, parameter)
    else:
        target_owner.register_buffer(name, tensor)


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, created (empty) where missing."""
    module = root
    for part in path.split("."):
        if part not in module._modules:
            module.add_module(part, nn.Module())
        child = module._modules[part]
        assert child is not None  # added above or present
        module = child
    return module


class CacheGuards(nn.Module):
    """The graph's check of its inputs: every cache tensor has ``input_ids``' batch and one
    past length (what the traced graph's own guard function checks, for every block).

    Called first in the graph, as the unlifted graph calls its guards, it also tells a
    re-export of the graph these equalities up front: without it, re-exporting SmolLM2 took
    ~25 % longer, its shapes unified op by op."""

    _is_impure = True  # called for its checks: dead-code elimination keeps it

    def forward(self, input_ids: torch.Tensor, *cache: torch.Tensor) -> None:
        for position, tensor in enumerate(cache):
            name = f"past_key_values[{position // _CACHE_PARTS}][{position % _CACHE_PARTS}]"
            batch, positions = tensor.shape[0], tensor.shape[2]
            torch._check(batch == input_ids.shape[0], _message(name, "batch", batch, input_ids.shape[0]))
            torch._check(positions == cache[0].shape[2], _message(name, "positions", positions, cache[0].shape[2]))


def _message(name: str, what: str, found: object, expected: object) -> Callable[[], str]:
    return lambda: f"{name} has {what} {found}, expected {expected} (as input_ids and past_key_values[0][0])"


_GUARDS = "_guards_fn"
"""Where the unlifted graph keeps its guard module (torch's input check looks for it there)."""


def _guard_inputs(graph_module: fx.GraphModule) -> None:
    """Replace the traced blocks' input guards by :class:`CacheGuards` over every input."""
    graph = graph_module.graph
    for node in list(graph.find_nodes(op="call_module", target=_GUARDS)):
        graph.erase_node(node)
    placeholders = list(graph.find_nodes(op="placeholder"))
    setattr(graph_module, _GUARDS, CacheGuards())
    with graph.inserting_after(placeholders[-1]):
        graph.call_module(_GUARDS, tuple(placeholders))


def _respecify(graph_module: fx.GraphModule, count: int) -> None:
    """The call and return structure of ``(input_ids, past) -> (logits, present)`` for ``count`` blocks."""
    cache = [(0, 0) for _ in range(count)]
    in_spec = pytree.tree_structure(((0, cache), {}))
    out_spec = pytree.tree_structure((0, cache))
    codegen = graph_module.graph._codegen
    if not isinstance(codegen, fx.graph._PyTreeCodeGen):
        raise NotRepeatable("the traced graph does not take and return the structured cache")
    codegen.pytree_info = codegen.pytree_info._replace(in_spec=in_spec, out_spec=out_spec)
    graph_module._in_spec = in_spec
    graph_module._out_spec = out_spec


# Relative max difference allowed between the repeated graph and the model, per dtype.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
_HALF_TOLERANCE = 2e-2


def _check_matches(graph_module: fx.GraphModule, model: nn.Module, kv_layout: KVCacheLayout, vocab_size: int) -> None:
    """Refuse the graph unless it computes the model's logits and present cache on a 2 x 5
    prefill after 3 cached positions."""
    generator = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, vocab_size, (2, 5), generator=generator)
    shape = (2, kv_layout.num_kv_heads, 3, kv_layout.head_dim)
    past = [
        (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype))
        for _ in range(kv_layout.num_layers)
    ]
    with torch.no_grad():
        expected = pytree.tree_leaves(CausalLMWithCache(model)(ids, past))
        actual = pytree.tree_leaves(graph_module(ids, past))
    tolerance = _TOLERANCE.get(dtype, _HALF_TOLERANCE)
    for position, (want, got) in enumerate(zip(expected, actual, strict=True)):
        scale = float(want.abs().max()) or 1.0
        difference = float((got.float() - want.float()).abs().max()) / scale
        if not difference <= tolerance:
            raise NotRepeatable(f"the repeated graph's output {position} differs from the model's by {difference:.2g}")
