"""Lifting a compiled graph into an exported program without a trace.

The program must be what a re-export gives (the same inputs by kind and target, the same
outputs), compute what the compiled graph computes bit for bit, keep its node names, give
every node a fake value, and be refused (then re-exported, with a warning) where it cannot.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import fx, nn

import fptq_compile as fptq
from fptq_compile.capture import GraphSignature
from fptq_compile.graph_utils import fetch_tensor
from fptq_compile.lift import NotLiftable, lift_graph
from fptq_compile.pipeline import export_graph


@pytest.fixture(scope="module")
def compiled():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return fptq.compile(tiny_llama(layers=3), ids, progress=False)


def _inputs(program: torch.export.ExportedProgram) -> list[tuple[object, object]]:
    return [(spec.kind, spec.target) for spec in program.graph_signature.input_specs]


def test_the_lifted_program_is_the_re_exported_one(compiled):
    signature = compiled.example_signature()
    lifted = lift_graph(compiled.graph_module, signature)
    traced = export_graph(compiled.graph_module, signature)
    assert sorted(_inputs(lifted), key=str) == sorted(_inputs(traced), key=str)
    assert len(lifted.graph_signature.output_specs) == len(traced.graph_signature.output_specs) == 7
    assert set(lifted.constants) == set(traced.constants)
    # The quantization ops the passes inserted carry fake values of their own.
    fptq_nodes = [node for node in lifted.graph.nodes if str(node.target).startswith("fptq.")]
    assert len(fptq_nodes) == 45 and all(isinstance(node.meta["val"], torch.Tensor) for node in fptq_nodes)
    assert all("val" in node.meta for node in lifted.graph.nodes if node.op != "output")
    computing = {node.name for node in compiled.graph_module.graph.nodes if node.op == "call_function"}
    assert computing == {node.name for node in lifted.graph.nodes if node.op == "call_function"}


def test_the_lifted_program_computes_the_compiled_graph(compiled):
    program = lift_graph(compiled.graph_module, compiled.example_signature())
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, present = program.module()(ids, compiled.kv_layout.empty(2))
    assert torch.equal(logits, compiled(ids))
    assert len(present) == 3 and present[0][0].shape[2] == 10
    # Its tensors are the graph's, not copies.
    target = next(node.target for node in compiled.graph_module.graph.nodes if node.op == "get_attr")
    assert program.state_dict[target] is fetch_tensor(compiled.graph_module, target)


def test_a_graph_calling_a_module_is_re_exported_with_a_warning(compiled):
    graph_module = fx.GraphModule(compiled.graph_module, copy.deepcopy(compiled.graph_module.graph))
    graph_module.range_constraints = compiled.graph_module.range_constraints
    graph_module.add_module("identity", nn.Identity())
    (placeholder, *_) = graph_module.graph.find_nodes(op="placeholder")
    user = next(iter(placeholder.users))
    with graph_module.graph.inserting_before(user):
        identity = graph_module.graph.call_module("identity", (placeholder,))
    user.replace_input_with(placeholder, identity)
    graph_module.recompile()
    with pytest.raises(NotLiftable, match="calls module identity"):
        lift_graph(graph_module, compiled.example_signature())
    with_module = fptq.CompiledModel(graph_module, compiled.plan, compiled.report, compiled.kv_layout, compiled.config)
    with pytest.warns(UserWarning, match="re-exporting the compiled graph") as warned:
        program = with_module.exported_program()
    assert warned[0].filename == __file__
    assert any(spec.kind.name == "USER_INPUT" for spec in program.graph_signature.input_specs)


def test_a_graph_not_from_export_is_refused():
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(NotLiftable, match=r"does not come from ExportedProgram\.module"):
        lift_graph(fx.symbolic_trace(Scale()), GraphSignature((torch.ones(2),)))
