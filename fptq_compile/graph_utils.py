"""Small helpers for FX graph surgery shared by the passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import fx, nn

from fptq_compile.errors import UnsupportedGraphError

ProbeT = TypeVar("ProbeT", bound=nn.Module)


def fetch_tensor(graph_module: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names (parameter, buffer or plain attribute)."""
    value: object = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise UnsupportedGraphError(f"get_attr {target!r} is not a tensor")
    return value


def find_node(graph_module: fx.GraphModule, name: str) -> fx.Node | None:
    return next((node for node in graph_module.graph.nodes if node.name == name), None)


def add_constant(graph_module: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``tensor`` as a new buffer of ``graph_module`` and read it before ``before``.

    Passes add tensors this way instead of editing existing parameters, which may be
    shared with the user's model or tied to another layer.
    """
    if hasattr(graph_module, name):
        raise UnsupportedGraphError(f"attribute {name!r} already exists on the graph module")
    graph_module.register_buffer(name, tensor.detach().contiguous())
    with graph_module.graph.inserting_before(before):
        return graph_module.graph.get_attr(name)


def drop_unused_attributes(graph_module: fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads; return how many.

    Only the graph module's own attribute tree is touched (the tensors of the user's
    model are shared, not owned): after folding and quantization the float weights it
    no longer reads would otherwise stay alive inside the compiled model.
    """
    used = {str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"}
    named = [name for name, _ in graph_module.named_parameters(remove_duplicate=False)]
    named += [name for name, _ in graph_module.named_buffers(remove_duplicate=False)]
    removed = 0
    for name in named:
        if name in used:
            continue
        owner_path, _, attribute = name.rpartition(".")
        owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
        if hasattr(owner, attribute):
            delattr(owner, attribute)
            removed += 1
    return removed


def insert_probe(
    graph_module: fx.GraphModule, source: fx.Node, readers: Sequence[fx.Node], probe: nn.Module, target: str
) -> fx.Node:
    """Route ``source`` through the pass-through module ``probe`` on its way to ``readers``.

    Analyses use probes (observers) to see activations during calibration; they are
    temporary and leave with :func:`remove_probes`.
    """
    graph_module.add_submodule(target, probe)
    with graph_module.graph.inserting_after(source):
        probed = graph_module.graph.call_module(target, (source,))
    probed.meta["val"] = source.meta.get("val")
    for reader in readers:
        reader.replace_input_with(source, probed)
    return probed


def find_probes(graph_module: fx.GraphModule, probe_type: type[ProbeT]) -> list[tuple[fx.Node, ProbeT]]:
    """The ``call_module`` nodes of the graph whose module is a ``probe_type``, in graph order."""
    found = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(str(node.target))
            if isinstance(module, probe_type):
                found.append((node, module))
    return found


def remove_probes(graph_module: fx.GraphModule, probe_type: type[nn.Module]) -> int:
    """Take every ``probe_type`` module out of the graph and the module tree; return how many."""
    probes = find_probes(graph_module, probe_type)
    for node, _ in probes:
        node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
        graph_module.graph.erase_node(node)
        delattr(graph_module, str(node.target))
    if probes:
        graph_module.graph.lint()
        graph_module.recompile()
    return len(probes)
