"""The linear kernel of the graphs calibration runs, never of a compiled graph.

On a CPU, torch computes a float32 ``aten.linear`` with MKL's sgemm. oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own CPU compiler emits for a
linear) computes the same product within float32 rounding of it (~1e-6 relative). On SmolLM2's
shapes it measured 10-30 % faster on an AMD Zen 4 (AVX-512), and 1-9 % slower on an Intel
Xeon with AMX, where the SmolLM2 pipeline's calibration took 18.7 s against MKL's 18.3 s
(medians of 3, within that host's noise): a gain on one CPU, about even on the other.
Calibration, its error probes and GPTQ's Hessians run every calibration token through
every linear, so :func:`with_calibration_kernels` gives them that kernel; what is compiled,
evaluated and exported keeps ``aten.linear``.
"""

from __future__ import annotations

import torch
from torch import fx

from fptq_compile.graph_utils import copied_graph

_LINEAR = torch.ops.aten.linear.default


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def calibration_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``aten.linear``, with oneDNN's kernel for float32 on the CPU outside autocast and autograd
    (autocast's bfloat16 calibration and every other case take ``aten.linear`` itself)."""
    if (
        input.device.type == "cpu"
        and input.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
    ):
        return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")
    return _LINEAR(input, weight, bias)


def with_calibration_kernels(graph_module: fx.GraphModule) -> fx.GraphModule:
    """``graph_module`` (called as it is, sharing its submodules and tensors) with each
    ``aten.linear`` computed by :func:`calibration_linear`; itself where oneDNN is missing."""
    if not onednn_linear_available():
        return graph_module
    graph, outputs = copied_graph(graph_module)
    graph.output(outputs)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == _LINEAR:
            node.target = calibration_linear
    return fx.GraphModule(graph_module, graph)
