"""Lower a ``torch.export`` program to ONNX with torch.onnx's translator, without its re-trace.

``torch.onnx.export(program)`` starts with ``program.run_decompositions``, which traces the
whole graph again under symbolic shapes, even when every op of it already has an ONNX
translation. For SmolLM2 that re-trace is ~19-25 s of a ~25-30 s ``torch.onnx.export`` on
a 2-core Zen 4 (``benchmarks/onnx_lowering.py``). A compiled graph holds few kinds of op
(SmolLM2: 33), which torchlib or :mod:`~fptq_compile.exporters.onnx_translations`
translate as they are, except ``aten.to`` and Python's ``&``, ``|``, ``^`` on masks, which
the decomposition rewrites as ``aten._to_copy`` and ``aten.bitwise_*``.

:func:`lower` therefore translates the program directly (``DIRECT``) when that holds: on
a copy of the graph it rewrites those ops as the decomposition would and runs the two
graph passes torch.onnx runs after decomposing (explicit type promotion, assertions
removed; the first only where :func:`needs_type_promotion` finds something to cast), and
hands it to torch.onnx's translator; then it converts the opset, names the
inputs, outputs and dynamic axes, and optimizes, as ``torch.onnx.export`` does. A program
with any other op outside the translation tables, or with an op that mutates its input
(which only the decomposition makes functional), goes through ``torch.onnx.export``
(``DECOMPOSED``), and :class:`Lowered` says why. Every family of ``tests/test_families.py``
takes the direct route.

The translator is torch.onnx's internal API (``torch.onnx._internal.exporter``, tested with
torch 2.13): should it move or fail on a graph, the program takes the ``DECOMPOSED`` route,
with that reason.
"""

from __future__ import annotations

import copy
import enum
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch
from onnxscript import version_converter
from torch import fx
from torch.utils import _pytree as pytree

from fptq_compile.errors import ExportError
from fptq_compile.exporters.onnx_translations import TRANSLATION_TABLE

_ATEN = torch.ops.aten
_TO_COPY = {_ATEN.to.dtype, _ATEN.to.device, _ATEN.to.dtype_layout}
"""The ``aten.to`` overloads that name their dtype, which torch.onnx's decomposition writes
as ``aten._to_copy(x, dtype=...)`` (the device and layout are not ONNX's concern)."""
_BITWISE = {
    _ATEN.__and__.Tensor: _ATEN.bitwise_and.Tensor,
    _ATEN.__or__.Tensor: _ATEN.bitwise_or.Tensor,
    _ATEN.__xor__.Tensor: _ATEN.bitwise_xor.Tensor,
}
"""Python's ``&``, ``|``, ``^`` on tensors (masks), as the decomposition writes them."""


class Route(enum.Enum):
    DIRECT = "direct"
    """Translated as captured: no re-trace."""
    DECOMPOSED = "decomposed"
    """Through ``torch.onnx.export``, which decomposes (re-traces) the program first."""


@dataclass(frozen=True)
class Lowered:
    model: ir.Model
    route: Route
    reason: str = ""
    """Why the program was decomposed ("" when translated directly)."""


def lower(
    program: torch.export.ExportedProgram,
    *,
    opset: int,
    dynamic_shapes: Any,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    optimize: bool,
) -> Lowered:
    """``program`` as an ONNX model in ``opset``, directly translated when every op allows it
    (see the module docstring), else through ``torch.onnx.export``. The program is not changed."""
    reason, registry = _direct_translation(program, opset)
    onnx_program = None
    if not reason:
        try:
            onnx_program = _translate(program, registry)
        except Exception as error:  # the translator raises many types: the public route may still work
            reason = f"the direct translation failed ({type(error).__name__}: {str(error)[:300]})"
    if onnx_program is None:
        model = _decomposed(program, opset, dynamic_shapes, input_names, output_names, optimize)
        return Lowered(model, Route.DECOMPOSED, reason)
    version_converter.convert_version(onnx_program.model, opset, fallback=True)
    if optimize:
        onnx_program.optimize()
    _name(onnx_program.model.graph.inputs, input_names)
    _name(onnx_program.model.graph.outputs, output_names)
    onnx_program.rename_axes(_axis_names(onnx_program.model.graph.inputs, dynamic_shapes))
    return Lowered(onnx_program.model, Route.DIRECT)


def _translate(program: torch.export.ExportedProgram, registry: Any) -> Any:
    """torch.onnx's translation of ``program`` (an ``ONNXProgram``), after the rewrites and the
    graph passes its decomposition route makes, on a copy of the graph."""
    from torch.onnx._internal.exporter import _core, _fx_passes  # _direct_translation found them

    copied = _as_decomposed(program)
    # As torch.onnx.export runs them (its config module installs ``patch`` at import).
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        if needs_type_promotion(copied.graph_module):
            _fx_passes.insert_type_promotion_nodes(copied.graph_module)
        _fx_passes.remove_assertion_nodes(copied.graph_module)
    return _core._exported_program_to_onnx_program(copied, registry=registry)


def needs_type_promotion(graph_module: fx.GraphModule) -> bool:
    """Whether torch.onnx's type-promotion pass would cast anything in ``graph_module``
    (True when this cannot tell).

    The pass re-runs every node on fake tensors (~4 s on SmolLM2, where it casts nothing).
    This asks its own rules the same question from the dtypes the graph records: for each
    node with a promotion rule, whether an argument's dtype differs from the one the rule
    promotes it to, which is exactly when the pass inserts a cast (after a cast a node keeps
    its dtype, so later nodes see the dtypes recorded here).
    """
    try:
        from torch.onnx._internal.fx import type_utils
        from torch.onnx._internal.fx.passes import type_promotion
    except ImportError:
        return True
    table = type_promotion.TypePromotionTable()
    for module in graph_module.modules():
        if not isinstance(module, fx.GraphModule):
            return True  # the pass refuses it: let it say so
        for node in module.graph.nodes:
            rule = type_promotion.get_type_promotion_rule(node, table)
            if rule is None:
                continue
            if any(arg.meta.get("val") is None for arg in node.all_input_nodes):
                return True
            args, kwargs = pytree.tree_map_only(fx.Node, lambda arg: arg.meta["val"], (node.args, node.kwargs))
            promotion = rule.preview_type_promotion(args, kwargs)
            targets = [(value, promotion.args_dtypes.get(index)) for index, value in enumerate(args)]
            targets += [(value, promotion.kwargs_dtypes.get(name)) for name, value in kwargs.items()]
            if any(_would_cast(value, dtype, type_utils) for value, dtype in targets):
                return True
    return False


def _would_cast(value: Any, dtype: torch.dtype | None, type_utils: Any) -> bool:
    """Whether the type-promotion pass casts argument ``value`` to ``dtype`` (None: left as it is)."""
    if dtype is None:
        return False
    if isinstance(value, torch.Tensor):
        return value.dtype != dtype
    if isinstance(value, (list, tuple)):
        return any(_would_cast(item, dtype, type_utils) for item in value)
    equivalent = type_utils.from_scalar_type_to_torch_dtype(type(value))  # Python and symbolic scalars
    return equivalent is None or equivalent != dtype


def _direct_translation(program: torch.export.ExportedProgram, opset: int) -> tuple[str, Any]:
    """Why ``program`` cannot be translated directly ("" if it can), and torch.onnx's
    registry of translations (torchlib's and fptq's) to translate it with."""
    try:
        from torch.onnx._internal.exporter import _core, _fx_passes, _registration  # noqa: F401
    except ImportError as error:  # torch.onnx's internals moved: the public route still works
        return f"torch.onnx's translator is not where this version of fptq looks for it ({error})", None
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for torch_op, onnx_function in TRANSLATION_TABLE.items():
        registry.register_op(torch_op, onnx_function, is_complex=False)
    return untranslatable_op(program.graph, registry), registry


def untranslatable_op(graph: fx.Graph, registry: Any) -> str:
    """Why ``graph`` cannot be translated without decomposing it ("" if it can): the first op
    that mutates an input or has no ONNX translation in ``registry``."""
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue  # placeholders, outputs, getitem and SymInt arithmetic translate as they are
        if target._schema.is_mutable:
            return f"{target} (node {node.name}) mutates its input: only the decomposition makes it functional"
        if target in _TO_COPY or target in _ASSERTIONS or registry.get_decomps(_BITWISE.get(target, target)):
            continue
        return f"{target} (node {node.name}) has no ONNX translation of its own: it must be decomposed"
    return ""


_ASSERTIONS = {
    _ATEN._assert_tensor_metadata.default,
    _ATEN._assert_scalar.default,
    _ATEN._assert_async.default,
    _ATEN._assert_async.msg,
    _ATEN.sym_constrain_range_for_size.default,
}
"""Checks torch.onnx removes before translating (``remove_assertion_nodes``)."""


def _as_decomposed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program on a copy of its graph (tensors shared) in which ``aten.to`` and the
    bitwise operators are written as the decomposition writes them."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(program.graph, {}))
    for node in list(graph.nodes):
        if node.op != "call_function" or (node.target not in _TO_COPY and node.target not in _BITWISE):
            continue
        with graph.inserting_before(node):
            if node.target in _TO_COPY:
                rewritten = graph.call_function(
                    _ATEN._to_copy.default, (node.args[0],), {"dtype": _dtype_argument(node)}
                )
            else:
                rewritten = graph.call_function(_BITWISE[node.target], node.args, node.kwargs)
        rewritten.meta = dict(node.meta)
        node.replace_all_uses_with(rewritten)
        graph.erase_node(node)
    return torch.export.ExportedProgram(
        root=program.graph_module,
        graph=graph,
        graph_signature=copy.deepcopy(program.graph_signature),
        state_dict=program.state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=program.constants,
        verifiers=program.verifiers,
    )


def _dtype_argument(node: fx.Node) -> Any:
    """The ``dtype`` an ``aten.to`` call passes, positionally or by keyword (None: unchanged)."""
    assert isinstance(node.target, torch._ops.OpOverload)  # an aten.to overload
    names = [argument.name for argument in node.target._schema.arguments]
    position = names.index("dtype")
    return node.args[position] if len(node.args) > position else node.kwargs.get("dtype")


def _name(values: Sequence[ir.Value], names: Sequence[str] | None) -> None:
    if names is None:
        return
    if len(names) != len(values):
        raise ExportError(f"{len(names)} names for {len(values)} graph inputs or outputs")
    for value, name in zip(values, names, strict=True):
        value.name = name


def _axis_names(inputs: Sequence[ir.Value], dynamic_shapes: Any) -> dict[str | ir.SymbolicDim, str]:
    """Each symbolic input dimension -> the name of the ``Dim`` it was exported with. Dims
    that share a ``Dim`` get its one name, whatever symbol each input carries."""
    specs = pytree.tree_leaves(dynamic_shapes, is_leaf=_axes_of_one_input)
    names: dict[str | ir.SymbolicDim, str] = {}
    if len(specs) != len(inputs):
        return names  # inputs torch.onnx dropped (None) or added: keep its names
    for value, spec in zip(inputs, specs, strict=True):
        if not isinstance(spec, dict) or value.shape is None:
            continue
        for axis, dim in spec.items():
            symbol = value.shape[axis]
            name = getattr(dim, "__name__", None)
            if isinstance(symbol, ir.SymbolicDim) and isinstance(symbol.value, str) and isinstance(name, str):
                names[symbol.value] = name
    return names


def _axes_of_one_input(spec: Any) -> bool:
    """An input's ``{axis: Dim}`` (int keys) or None, as against a dict of inputs by name."""
    return spec is None or (isinstance(spec, dict) and all(isinstance(axis, int) for axis in spec))


def _decomposed(
    program: torch.export.ExportedProgram,
    opset: int,
    dynamic_shapes: Any,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    optimize: bool,
) -> ir.Model:
    """``torch.onnx.export`` of the program (it decomposes, then translates)."""
    try:
        with warnings.catch_warnings():
            # An exported GraphModule refuses .eval(); its aten graph has no train/eval switch.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=TRANSLATION_TABLE,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=optimize,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; keep the cause
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    if onnx_program is None:
        raise ExportError("torch.onnx.export returned no program")
    model: ir.Model = onnx_program.model
    return model
