from __future__ import annotations

import torch
from torch import nn

from fptq_compile.capture import module_path_of
from fptq_compile.passes.canonicalize_linears import canonicalize_linears, unsupported_matmuls

aten = torch.ops.aten


class _Conv1DLike(nn.Module):
    """GPT-2's Conv1D (addmm on a flattened input, weight [in, out]), a bias-free x @ W, a shared
    weight read twice, and a parameter on the left of a matmul (not a linear's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 24))
        self.bias = nn.Parameter(torch.randn(24))
        self.projection = nn.Parameter(torch.randn(24, 8))
        self.left = nn.Parameter(torch.randn(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(self.bias, x.view(-1, 16), self.weight).view(*x.shape[:-1], 24)
        projected = torch.matmul(flat, self.projection) + torch.matmul(flat, self.projection)
        return projected.sum() + (self.left @ x[0, :5, :5]).sum()


class _Parent(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _exported(module: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(_Parent(module), (x,), strict=False).module()


def _targets(graph_module: torch.fx.GraphModule) -> list:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]


def test_parameter_matmuls_become_linears_with_transposed_constants():
    torch.manual_seed(0)
    module = _Conv1DLike()
    x = torch.randn(2, 6, 16)
    graph_module = _exported(module, x)
    reference = graph_module(x)
    original_weight = module.weight.detach().clone()
    result = canonicalize_linears(graph_module)
    assert result.modified and result.report == {"rewritten": 3}
    targets = _targets(result.graph_module)
    assert targets.count(aten.linear.default) == 3 and aten.addmm.default not in targets
    # One transposed constant per parameter, shared by its two readers; the user's tensor untouched.
    linears = [node for node in graph_module.graph.nodes if node.target == aten.linear.default]
    assert len({node.args[1] for node in linears}) == 2
    assert torch.equal(graph_module.get_buffer("fptq_t_block_weight"), original_weight.t())
    assert torch.equal(module.weight, original_weight)
    assert torch.allclose(graph_module(x), reference, rtol=1e-5, atol=1e-4)
    # The module path survives (the plan names layers by it).
    assert [module_path_of(node) for node in linears] == ["block"] * 3


def test_matmuls_it_cannot_rewrite_are_listed_and_a_second_run_changes_nothing():
    module = _Conv1DLike()
    x = torch.randn(2, 6, 16)
    graph_module = _exported(module, x)
    canonicalize_linears(graph_module)
    ((node, reason),) = unsupported_matmuls(graph_module)
    assert node.target in (aten.mm.default, aten.matmul.default) and "kept float" in reason
    code = graph_module.code
    assert not canonicalize_linears(graph_module).modified and graph_module.code == code


def test_a_graph_without_parameter_matmuls_is_left_unchanged():
    class _Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x.transpose(-1, -2)

    graph_module = _exported(_Plain(), torch.randn(2, 3, 4))
    code = graph_module.code
    result = canonicalize_linears(graph_module)
    assert not result.modified and result.report == {"rewritten": 0} and graph_module.code == code
    assert unsupported_matmuls(graph_module) == []
