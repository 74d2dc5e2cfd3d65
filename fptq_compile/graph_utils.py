"""Small helpers for FX graph surgery shared by the passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

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


def replace_tensor(module: nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Make the parameter or buffer at ``target`` (a dotted path) be ``tensor``."""
    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path)
    if name in owner._parameters:
        owner._parameters[name] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    elif name in owner._buffers:
        owner._buffers[name] = tensor
    else:  # a constant the export attached as a plain attribute
        setattr(owner, name, tensor)


def retarget_devices(graph_module: fx.GraphModule, source: str, target: str) -> int:
    """Make the graph's ops that name device ``source`` (``arange(..., device=...)``, ``to``,
    metadata asserts) name ``target`` instead; return how many arguments changed. A graph
    traced on meta tensors names ``meta`` wherever the model named its tensors' device."""
    source_device, target_device = torch.device(source), torch.device(target)
    changed = 0

    def swap(value: fx.node.Argument) -> fx.node.Argument:
        nonlocal changed
        if isinstance(value, torch.device) and value == source_device:
            changed += 1
            return target_device
        return value

    for node in graph_module.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    if changed:
        graph_module.recompile()
    return changed


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


def attribute_targets(graph_module: fx.GraphModule) -> list[str]:
    """The tensors the graph reads, by attribute path, each once, in graph order."""
    return list(dict.fromkeys(str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"))


def drop_unused_attributes(graph_module: fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads; return how many.

    Only the graph module's own attribute tree is touched (the tensors of the user's
    model are shared, not owned): after folding and quantization the float weights it
    no longer reads would otherwise stay alive inside the compiled model.
    """
    used = set(attribute_targets(graph_module))
    named = [name for name, _ in graph_module.named_parameters(remove_duplicate=False)]
    named += [name for name, _ in graph_module.named_buffers(remove_duplicate=False)]
    return sum(_delete_attribute(graph_module, name) for name in named if name not in used)


def release_if_unused(graph_module: fx.GraphModule, node: object) -> None:
    """Erase ``node`` if it is a ``get_attr`` nothing reads any more, and delete its tensor
    if no other node reads it: a pass that replaces a weight frees the old one at once, not
    when the pass ends (a big model's block holds several 100 MB weights)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or node.users:
        return
    target = str(node.target)
    graph_module.graph.erase_node(node)
    if target not in attribute_targets(graph_module):
        _delete_attribute(graph_module, target)


def _delete_attribute(graph_module: fx.GraphModule, name: str) -> bool:
    owner_path, _, attribute = name.rpartition(".")
    owner = graph_module.get_submodule(owner_path) if owner_path else graph_module
    if not hasattr(owner, attribute):
        return False
    delattr(owner, attribute)
    return True


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


def copied_graph(graph_module: fx.GraphModule) -> tuple[fx.Graph, Any]:
    """A new graph with ``graph_module``'s nodes (metadata shared, not deep-copied) and
    calling convention (its pytree input and output specs), without an output node; and
    the copies of what the graph outputs, for the caller's own output node."""
    graph = fx.Graph()
    graph.set_codegen(graph_module.graph._codegen)
    return graph, graph.graph_copy(graph_module.graph, {})


def probes_only(graph_module: fx.GraphModule, probe_type: type[nn.Module]) -> fx.GraphModule:
    """The graph cut down to what its ``probe_type`` probes see.

    The result is called as ``graph_module`` is, shares its submodules and tensors, and
    returns ``None`` for every output; nothing that only feeds the outputs is computed
    (a causal LM's logits, its largest matmul, are not what calibration measures).
    """
    graph, outputs = copied_graph(graph_module)
    graph.output(pytree.tree_map(lambda _: None, outputs))
    probes = {node.name for node, _ in find_probes(graph_module, probe_type)}
    cut = fx.GraphModule(graph_module, graph)
    cut.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or node.name in probes)
    if sum(node.name in probes for node in cut.graph.nodes) != len(probes):
        raise UnsupportedGraphError("cutting the graph down to its probes lost one of them")
    cut.recompile()
    return cut


_ATEN = torch.ops.aten
_CASTS = (_ATEN.to.dtype, _ATEN.type_as.default, _ATEN._to_copy.default, _ATEN.clone.default, _ATEN.alias.default)
_VIEWS = (_ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default)


def _last_dim(node: object) -> object:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else None


def _float_dtype(node: object) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) and value.dtype.is_floating_point else None


def is_channel_transparent(node: fx.Node) -> bool:
    """Whether ``node`` passes its first input through with every last-dimension channel
    intact and unscaled: a float-to-float cast, a copy, or a view that keeps the last dimension.

    A per-channel scale commutes with such a node, so a fold may look through it.
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    if node.target in _CASTS:
        return _float_dtype(node) is not None and _float_dtype(source) is not None
    if node.target in _VIEWS:
        channels = _last_dim(node)
        return channels is not None and channels == _last_dim(source)
    return False


def transparent_source(node: fx.Node) -> fx.Node:
    """Walk back from ``node`` through channel-transparent nodes whose input feeds nothing
    else (:func:`is_channel_transparent`); return the first node that is not one of them."""
    while is_channel_transparent(node):
        source = node.args[0]
        assert isinstance(source, fx.Node)  # checked by is_channel_transparent
        if len(source.users) != 1:
            break
        node = source
    return node


@dataclass(frozen=True)
class ChannelGain:
    """A per-channel gain ``offset + p`` built from a 1-D parameter ``p`` (RMSNorm's ``w``;
    Gemma's ``1 + w``), seen through float casts."""

    parameter: fx.Node
    """The ``get_attr`` node of ``p``."""
    reader: fx.Node
    """The node that reads ``parameter`` on the way to the gain (where a fold rewires it)."""
    offset: float


def channel_gain(graph_module: fx.GraphModule, arg: object, consumer: fx.Node) -> ChannelGain | None:
    """``arg`` of ``consumer`` as a :class:`ChannelGain` over ``consumer``'s last dimension, or None.

    Recognised: a 1-D ``get_attr`` as long as that dimension, under any chain of float casts
    and additions of a Python scalar (``add(cast(w), 1.0)``), each read only on the way.
    """
    offset, reader = 0.0, consumer
    while isinstance(arg, fx.Node) and arg.op == "call_function" and len(arg.users) == 1:
        if arg.target in _CASTS and _float_dtype(arg) is not None:
            reader, arg = arg, arg.args[0]
        elif arg.target == _ATEN.add.Tensor and len(arg.args) == 2 and not arg.kwargs:
            tensors = [a for a in arg.args if isinstance(a, fx.Node)]
            scalars = [a for a in arg.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if len(tensors) != 1 or len(scalars) != 1:
                return None
            offset += float(scalars[0])
            reader, arg = arg, tensors[0]
        else:
            return None
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    tensor = fetch_tensor(graph_module, str(arg.target))
    channels = _last_dim(consumer)
    if tensor.dim() != 1 or not tensor.is_floating_point() or (channels is not None and tensor.shape[0] != channels):
        return None
    return ChannelGain(arg, reader, offset)
