from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fptq_compile.passes.remove_identity_ops import remove_identity_ops

aten = torch.ops.aten


class _WithIdentities(nn.Module):
    """What a captured Hugging Face model holds: a cache layer started from an empty tensor,
    a float32 upcast of a float32 tensor, full-range slices; and next to them a real cast
    (int64 -> float32) and a real slice, which must stay."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = torch.cat([torch.tensor([]), x], dim=-2)
        upcast = cache.to(torch.float32)[:, :, 0:]
        return upcast[:, 1:] * 2 + positions.to(torch.float32).sum(), x


def _captured() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    inputs = (torch.randn(2, 5, 3), torch.arange(4))
    dynamic = ({0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}, {0: Dim.AUTO})
    return torch.export.export(_WithIdentities(), inputs, dynamic_shapes=dynamic, strict=False).module(), inputs


def _targets(graph_module: torch.fx.GraphModule) -> list:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]


def test_identities_are_removed_and_real_ops_kept():
    graph_module, _ = _captured()
    before = _targets(graph_module)
    assert before.count(aten.cat.default) == 1 and before.count(aten.to.dtype) == 2
    assert aten._assert_tensor_metadata.default in before and aten.lift_fresh_copy.default in before
    result = remove_identity_ops(graph_module)
    assert result.modified
    assert result.report == {"slice": 4, "alias": 0, "to": 1, "cat": 1, "assert": 1}
    after = _targets(result.graph_module)
    for gone in (aten.cat.default, aten.lift_fresh_copy.default, aten.detach_.default):
        assert gone not in after
    # The int64 -> float32 cast, the slice from 1 and the check of the input it casts stay.
    assert after.count(aten.to.dtype) == 1 and after.count(aten.slice.Tensor) == 1
    assert after.count(aten._assert_tensor_metadata.default) == 1
    # The empty constant goes with its wrappers.
    assert not [node for node in graph_module.graph.nodes if node.op == "get_attr"]
    assert not [name for name in vars(graph_module) if name.startswith("lifted_tensor")]


def test_outputs_are_bit_identical():
    graph_module, inputs = _captured()
    expected = graph_module(*inputs)
    remove_identity_ops(graph_module)
    for shape in ((2, 5, 3), (1, 7, 4)):
        x = torch.randn(shape)
        reference = _WithIdentities()(x, inputs[1])
        actual = graph_module(x, inputs[1])
        assert all(torch.equal(a, b) for a, b in zip(actual, reference, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(graph_module(*inputs), expected, strict=True))


def test_an_output_is_never_replaced_by_an_input():
    class _SliceOut(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0:]

    graph_module = torch.export.export(
        _SliceOut(), (torch.randn(2, 3),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False
    ).module()
    assert remove_identity_ops(graph_module).report["slice"] == 1  # x[:, ...] feeds x[:, 0:]
    assert _targets(graph_module).count(aten.slice.Tensor) == 1  # the output's own slice stays


def test_second_run_and_a_graph_without_identities_change_nothing():
    graph_module, _ = _captured()
    remove_identity_ops(graph_module)
    code = graph_module.code
    again = remove_identity_ops(graph_module)
    assert not again.modified and graph_module.code == code
    assert again.report == {"slice": 0, "alias": 0, "to": 0, "cat": 0, "assert": 0}
