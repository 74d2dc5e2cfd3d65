import pytest
import torch
from torch import fx

from fptq_compile.kernels import calibration_linear, onednn_linear_available, with_calibration_kernels

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear")


class TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _graph() -> fx.GraphModule:
    torch.manual_seed(0)
    program = torch.export.export(TwoLinears().eval(), (torch.randn(2, 5, 64),))
    return program.module()


def test_calibration_linear_is_a_linear_within_float32_rounding():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 7, 64), torch.randn(48, 64), torch.randn(48)
    for b in (bias, None):
        expected = torch.nn.functional.linear(x, weight, b)
        actual = calibration_linear(x, weight, b)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_graph_computes_what_the_graph_does_and_leaves_it_alone():
    graph_module = _graph()
    targets = [node.target for node in graph_module.graph.nodes]
    fast = with_calibration_kernels(graph_module)
    linears = [node for node in fast.graph.nodes if node.target is calibration_linear]
    assert len(linears) == 2
    assert [node.target for node in graph_module.graph.nodes] == targets  # the graph itself keeps aten.linear
    assert torch.ops.aten.linear.default in targets
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), graph_module(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_and_autograd_take_aten_linear(monkeypatch):
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or onednn(*args))
    x, weight = torch.randn(2, 64), torch.randn(8, 64)
    with torch.no_grad():
        calibration_linear(x, weight)
    assert calls == [1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert calibration_linear(x, weight).dtype == torch.bfloat16  # autocast's cast happened
    calibration_linear(x, weight.requires_grad_())  # autograd: oneDNN's op has no gradient
    assert calls == [1]
