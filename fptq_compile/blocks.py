"""Decoder blocks: found in the model, captured once as their own graph, run one after another.

Block-sequential calibration needs three things, none of them tied to a family:

- :func:`find_blocks`: where the repeated blocks are, the longest ``nn.ModuleList`` of
  modules of one class that hold 2-D parameters (Llama's ``model.layers``, GPT-2's
  ``transformer.h``);
- :func:`first_block_inputs`: what the model passes into its first block for each batch
  (hidden states, position embeddings, masks), recorded by running the model only up to
  that block;
- :func:`capture_block`: one ``torch.export`` graph of block 0, which :meth:`BlockGraph.bind`
  gives any other block's parameters (all blocks share one structure: capture once).

The blocks of a model must all be called with the same keyword inputs (checked by
:func:`check_blocks_share_inputs`): a model that gives some blocks another mask (Gemma-2's
sliding-window layers) is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from fptq_compile.capture import LinearSite, find_linear_sites
from fptq_compile.errors import UnsupportedGraphError
from fptq_compile.graph_utils import fetch_tensor, replace_tensor
from fptq_compile.passes.canonicalize_linears import canonicalize_linears
from fptq_compile.passes.remove_identity_ops import remove_identity_ops

BlockCall = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword inputs of one call of a block."""


@dataclass(frozen=True)
class DecoderBlocks:
    """The repeated blocks of a model, and where they sit in it."""

    path: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def block_path(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_blocks(model: nn.Module) -> DecoderBlocks:
    """The longest ``nn.ModuleList`` of modules of one class that each hold a 2-D parameter."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and all(any(p.dim() == 2 for p in child.parameters()) for child in module)
    ]
    if not candidates:
        raise UnsupportedGraphError(
            f"{type(model).__name__} has no list of repeated blocks with linear layers: it cannot be compiled "
            "block by block"
        )
    name, layers = max(candidates, key=lambda candidate: len(candidate[1]))
    return DecoderBlocks(name, layers)


class _ReachedBlock(Exception):
    """Raised by the hook on the first block: the model has run as far as needed."""


def first_block_inputs(model: nn.Module, blocks: DecoderBlocks, batches: Sequence[torch.Tensor]) -> list[BlockCall]:
    """For each batch of token ids, the inputs the model gives its first block.

    The model runs only up to that block (embeddings, position embeddings, masks): a hook
    records the call and stops the forward there.
    """
    calls: list[BlockCall] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))
        raise _ReachedBlock

    handle = blocks.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _ReachedBlock:
                    continue
                raise UnsupportedGraphError(f"{type(model).__name__} never called its block {blocks.block_path(0)}")
    finally:
        handle.remove()
    return calls


def check_blocks_share_inputs(model: nn.Module, blocks: DecoderBlocks, token_ids: torch.Tensor) -> None:
    """Refuse a model whose blocks are given different keyword inputs (e.g. another mask),
    checked on one forward of ``token_ids``: every block must see block 0's."""
    seen: list[dict[str, Any]] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(kwargs)
        if len(seen) == len(blocks):
            raise _ReachedBlock  # the last block's inputs are known: no need to run it or the head

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in blocks.layers]
    try:
        with torch.no_grad():
            model(input_ids=token_ids, use_cache=False)
    except _ReachedBlock:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for index, kwargs in enumerate(seen[1:], start=1):
        if not _same_inputs(kwargs, seen[0]):
            raise UnsupportedGraphError(
                f"block {blocks.block_path(index)} is called with other inputs than block {blocks.block_path(0)} "
                "(e.g. a sliding-window mask): it cannot share block 0's graph"
            )


def _same_inputs(first: Any, second: Any) -> bool:
    leaves, spec = pytree.tree_flatten(first)
    other_leaves, other_spec = pytree.tree_flatten(second)
    if spec != other_spec:
        return False
    for leaf, other in zip(leaves, other_leaves, strict=True):
        if isinstance(leaf, torch.Tensor) and isinstance(other, torch.Tensor):
            if leaf.shape != other.shape or not torch.equal(leaf, other):
                return False
        elif isinstance(leaf, torch.Tensor) or isinstance(other, torch.Tensor) or leaf != other:
            return False
    return True


@dataclass(frozen=True)
class BlockGraph:
    """One block captured as a graph ``(its inputs) -> its output``, with its linears
    (module paths relative to the block)."""

    graph_module: fx.GraphModule
    linears: tuple[LinearSite, ...]

    def bind(self, block: nn.Module) -> fx.GraphModule:
        """A copy of the graph reading ``block``'s parameters and buffers, its matmuls
        rewritten as ``aten.linear`` as ``capture`` rewrites the whole graph's (GPT-2's
        ``Conv1D``: the transposed weight is ``block``'s own); constants the export
        created, which no block owns, are shared."""
        owner = _WithConstants(block, {})  # the module tree the graph's attribute names follow
        bound = fx.GraphModule(self.graph_module, copy.deepcopy(self.graph_module.graph))
        for node in bound.graph.nodes:
            if node.op == "get_attr":
                tensor = own_tensor(owner, str(node.target))
                if tensor is not None:
                    replace_tensor(bound, str(node.target), tensor)
        canonicalize_linears(bound)
        return bound

    def module_path(self, blocks: DecoderBlocks, index: int, site: LinearSite) -> str:
        """A linear's path in the whole model (``model.layers.3.self_attn.q_proj``)."""
        return f"{blocks.block_path(index)}.{site.module_path.removeprefix(_BLOCK + '.')}"


def own_tensor(module: nn.Module, target: str) -> torch.Tensor | None:
    """The parameter or buffer of ``module`` at the dotted path ``target`` (None: it has none there)."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = module.get_submodule(owner_path)
    except AttributeError:
        return None
    tensor = owner._parameters.get(name)
    return tensor if tensor is not None else owner._buffers.get(name)


def capture_block(blocks: DecoderBlocks, call: BlockCall, block: nn.Module | None = None) -> BlockGraph:
    """``torch.export`` of block 0 as called by the model (``call``), every input dimension
    longer than 1 dynamic (a dimension of 1, as position embeddings' batch, stays 1).

    ``block`` is block 0 holding its weights, when ``blocks.layers[0]`` does not (offloaded)."""
    inputs = _tensor_inputs(call, call[0][0])
    constants = {key: value for key, value in call[1].items() if key not in inputs}
    module = _WithConstants(blocks.layers[0] if block is None else block, constants)
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (inputs,), dynamic_shapes=(_dynamic_shapes(inputs),), strict=False)
    except Exception as error:  # torch.export raises many unrelated types; name the cause
        raise UnsupportedGraphError(
            f"torch.export could not capture block {blocks.block_path(0)} "
            f"({type(blocks.layers[0]).__name__}): {type(error).__name__}: {error}"
        ) from error
    graph_module = exported.module()
    remove_identity_ops(graph_module)  # as capture() does for the whole graph, whose names it maps to
    # The graph is a template that bind() gives each block's tensors: it keeps none of block
    # 0's (a big model's block is hundreds of MB), only their shapes and dtypes.
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and own_tensor(module, str(node.target)) is not None:
            tensor = fetch_tensor(graph_module, str(node.target))
            replace_tensor(graph_module, str(node.target), torch.empty_like(tensor, device="meta"))
    # The linears as bind() will name them: found on a rewritten copy (its tensors are meta).
    canonical = fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    canonicalize_linears(canonical)
    return BlockGraph(graph_module, find_linear_sites(canonical))


_POSITIONAL = ("hidden_states", "positional_1", "positional_2", "positional_3")


_BLOCK = "block"


class _WithConstants(nn.Module):
    """A block called with one dict of its tensor inputs (by name; the positional ones as
    ``hidden_states``, ``positional_<i>``), its other inputs (flags, None) fixed."""

    def __init__(self, block: nn.Module, constants: dict[str, Any]) -> None:
        super().__init__()
        setattr(self, _BLOCK, block)
        self.constants = constants

    def forward(self, inputs: dict[str, Any]) -> Any:
        args = [inputs[name] for name in _POSITIONAL if name in inputs]
        keyword = {name: value for name, value in inputs.items() if name not in _POSITIONAL}
        return getattr(self, _BLOCK)(*args, **keyword, **self.constants)


def _dynamic_shapes(inputs: Any) -> Any:
    def dims(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        return {dim: Dim.AUTO for dim in range(value.dim()) if value.shape[dim] > 1}

    return pytree.tree_map(dims, inputs)


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (alone, or first of a tuple)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        raise UnsupportedGraphError(f"a block returned {type(hidden).__name__}, not its hidden states")
    return hidden


def run_block(graph_module: fx.GraphModule, call: BlockCall, hidden_states: torch.Tensor) -> torch.Tensor:
    """Run a bound block graph on ``hidden_states`` with the rest of ``call``'s inputs."""
    return block_output(graph_module(_tensor_inputs(call, hidden_states)))


def _tensor_inputs(call: BlockCall, hidden_states: torch.Tensor) -> dict[str, Any]:
    """The one dict a captured block takes: ``call``'s positional inputs by their
    ``_POSITIONAL`` names (``hidden_states`` first) and its keyword inputs holding tensors."""
    args, kwargs = call
    tensor_kwargs = {key: value for key, value in kwargs.items() if _holds_tensor(value)}
    return {**dict(zip(_POSITIONAL, (hidden_states, *args[1:]), strict=False)), **tensor_kwargs}
