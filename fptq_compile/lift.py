"""A compiled graph as a ``torch.export`` program, without tracing it again.

Saving and ONNX lowering take an ``ExportedProgram``. Re-exporting the compiled graph to get
one traces every node again under symbolic shapes (~8 s for SmolLM2 on a 2-core Zen 4),
though the graph came from ``torch.export`` and its nodes still carry their fake values.
:func:`lift_graph` undoes what ``ExportedProgram.module()`` did instead:

- every tensor the graph reads with ``get_attr`` becomes an input placeholder, in the
  order the graph first reads them: parameters, buffers (persistent or not, as the module
  holds them) and plain tensor attributes (constants), named as ``torch.export`` names them
  (``p_``, ``b_``, ``c_`` and the attribute path);
- the graph's own inputs follow, then its nodes, without the guard-function call that
  unlifting added (the program's range constraints and input shapes say the same);
- a node the passes added without a fake value (``torch.ops.fptq`` quantization ops) gets
  one, computed by its fake kernel in the graph's fake mode;
- the call structure (``in_spec``, ``out_spec``) and range constraints are the graph's.

Before: ``get_attr[w] -> linear(x, w)`` (unlifted graph module)
After:  ``placeholder p_w -> linear(x, p_w)`` with ``InputSpec(PARAMETER, target=w)``

Nothing is copied: the program's state dict holds the graph module's tensors. A graph
this cannot lift (:class:`NotLiftable`) is re-exported by the caller.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._export.verifier import TrainingIRVerifier
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    SymIntArgument,
    TensorArgument,
)
from torch.utils import _pytree as pytree

from fptq_compile.capture import GraphSignature

_GUARDS = "_guards_fn"
_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}


class NotLiftable(Exception):
    """Why a graph module cannot be lifted into a program without a trace."""


def lift_graph(graph_module: fx.GraphModule, signature: GraphSignature) -> torch.export.ExportedProgram:
    """``graph_module`` (unlifted, from ``ExportedProgram.module()``, edited by passes) as an
    exported program sharing its tensors (see the module docstring)."""
    codegen = graph_module.graph._codegen
    range_constraints = getattr(graph_module, "range_constraints", None)
    if not isinstance(codegen, fx.graph._PyTreeCodeGen) or range_constraints is None:
        raise NotLiftable("the graph module does not come from ExportedProgram.module()")
    fake_mode = _fake_mode(graph_module.graph)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    input_specs: list[InputSpec] = []
    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    lifted: dict[str, fx.Node] = {}
    for node in graph_module.graph.find_nodes(op="get_attr"):
        target = str(node.target)
        if target not in lifted:
            tensor, kind, persistent = _state(graph_module, target)
            placeholder = graph.placeholder(_PREFIX[kind] + target.replace(".", "_"))
            placeholder.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
            lifted[target] = placeholder
            input_specs.append(InputSpec(kind, TensorArgument(placeholder.name), target, persistent))
            (state_dict if persistent else constants)[target] = tensor
        copies[node] = lifted[str(node.target)]
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_module" and node.target == _GUARDS):
            continue
        if node.op == "call_module":
            raise NotLiftable(f"the graph calls module {node.target} (node {node.name})")
        if node.op == "output":
            outputs = [copies[value] if isinstance(value, fx.Node) else value for value in node.args[0]]
            graph.output(tuple(outputs))
            continue
        copy = graph.node_copy(node, lambda arg: copies[arg])
        if node.op == "placeholder":
            input_specs.append(InputSpec(InputKind.USER_INPUT, _argument(copy), None))
        elif "val" not in copy.meta:
            copy.meta["val"] = _fake_value(copy, fake_mode)
        copies[node] = copy
    output_specs = [OutputSpec(OutputKind.USER_OUTPUT, _argument(value), None) for value in outputs]
    info = codegen.pytree_info
    if info.out_spec is None:
        raise NotLiftable("the graph module records no output structure")
    call = ModuleCallSignature([], [], info.in_spec, info.out_spec, forward_arg_names=list(info.orig_args))
    return torch.export.ExportedProgram(
        root=graph_module,
        graph=graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints=range_constraints,
        module_call_graph=[ModuleCallEntry("", call)],
        example_inputs=(signature.args, signature.kwargs),
        constants=constants,
        verifiers=[TrainingIRVerifier],
    )


def _fake_mode(graph: fx.Graph) -> FakeTensorMode:
    values = [node.meta["val"] for node in graph.find_nodes(op="placeholder") if "val" in node.meta]
    fake_mode = detect_fake_mode(values)
    if fake_mode is None:
        raise NotLiftable("the graph's inputs carry no fake values")
    return fake_mode


def _state(graph_module: fx.GraphModule, target: str) -> tuple[torch.Tensor, InputKind, bool]:
    """The tensor at ``target``, what kind of input it lifts to, and whether it is persistent
    (in the state dict) rather than a constant."""
    owner_path, _, name = target.rpartition(".")
    owner = graph_module.get_submodule(owner_path)
    if name in owner._parameters:
        parameter = owner._parameters[name]
        assert parameter is not None  # a get_attr node reads it
        return parameter, InputKind.PARAMETER, True
    if name in owner._buffers:
        buffer = owner._buffers[name]
        assert buffer is not None  # a get_attr node reads it
        return buffer, InputKind.BUFFER, name not in owner._non_persistent_buffers_set
    value = getattr(owner, name)
    if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
        raise NotLiftable(f"get_attr {target} reads a {type(value).__name__}, not a tensor")
    return value, InputKind.CONSTANT_TENSOR, False


def _argument(node: fx.Node) -> TensorArgument | SymIntArgument:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return TensorArgument(node.name)
    if isinstance(value, torch.SymInt):
        return SymIntArgument(node.name)
    raise NotLiftable(f"node {node.name} is neither a tensor nor a size: {type(value).__name__}")


def _fake_value(node: fx.Node, fake_mode: FakeTensorMode) -> object:
    """What ``node`` computes, on its inputs' fake values (its op's fake kernel)."""
    if not callable(node.target):
        raise NotLiftable(f"node {node.name} ({node.op}) has no fake value")
    args, kwargs = pytree.tree_map_only(fx.Node, lambda arg: arg.meta["val"], (node.args, node.kwargs))
    with fake_mode:
        return node.target(*args, **kwargs)
