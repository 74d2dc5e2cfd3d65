"""Insert temporary activation observers in front of the linears to quantize.

Before: ``linear(x, w)``, ``linear(x, w2)`` (two linears reading one tensor ``x``)
After:  ``x_seen = observer(x)``; ``linear(x_seen, w)``, ``linear(x_seen, w2)``

One observer per distinct input tensor: q/k/v (and gate/up) read the same activation,
so it is measured once. Each observer keeps a streaming per-channel ``max|x|`` (one
vectorized reduction per batch, no Python loop over channels or tokens) and, when GPTQ
needs it, the input's Hessian ``X^T X / n`` (one matmul per batch). After the
calibration batches, :func:`read_activation_stats` reads the observers out into
:class:`ActivationStats` keyed by linear node name, and :func:`remove_observers` restores
the graph. Preconditions: the linears come from :func:`fptq_compile.capture.find_linear_sites`
on this graph. Postcondition of ``remove_observers``: no observer is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from fptq_compile import primitives
from fptq_compile.capture import LinearSite
from fptq_compile.errors import CalibrationError, PreconditionError
from fptq_compile.gptq import add_gram_upper, symmetric_from_upper
from fptq_compile.graph_utils import find_node, find_probes, insert_probe, remove_probes
from fptq_compile.passes.base import PassResult

_OBSERVER_PREFIX = "fptq_observer_"


class ActivationObserver(nn.Module):
    """Passes its input through and records the running per-channel ``max|x|``."""

    def __init__(self, input_node: str, linears: Sequence[str], hessian_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_node = input_node
        self.linears = tuple(linears)
        self.hessian_dtype = hessian_dtype
        self.channel_absmax: torch.Tensor | None = None
        self.input_gram: torch.Tensor | None = None
        """``X^T X`` summed in float32 over the tokens seen, ``X`` rounded to ``hessian_dtype``
        (None: not collected), its upper triangle only (:func:`~fptq_compile.gptq.add_gram_upper`)."""
        self.num_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1])
        batch_absmax = primitives.absmax(rows, dim=0).to(torch.float32)
        if self.channel_absmax is None:
            self.channel_absmax = batch_absmax
        else:
            torch.maximum(self.channel_absmax, batch_absmax, out=self.channel_absmax)
        if self.hessian_dtype is not None:
            self.input_gram = add_gram_upper(self.input_gram, rows.to(torch.float32), self.hessian_dtype)
        self.num_tokens += rows.shape[0]
        return x


@dataclass(frozen=True)
class ChannelStats:
    """Calibration statistics of one linear's input."""

    input_node: str
    channel_absmax: torch.Tensor
    num_tokens: int
    hessian: torch.Tensor | None = None
    """``X^T X / n`` over the calibration tokens ``[in, in]``, when collected (for GPTQ)."""

    @property
    def tensor_absmax(self) -> float:
        return float(self.channel_absmax.max())


@dataclass(frozen=True)
class ActivationStats:
    """Per linear node name, the statistics of its input over the calibration data."""

    per_linear: Mapping[str, ChannelStats]

    def __getitem__(self, linear_node: str) -> ChannelStats:
        return self.per_linear[linear_node]


def insert_observers(
    graph_module: fx.GraphModule, linears: Sequence[LinearSite], hessian_dtype: torch.dtype | None = None
) -> PassResult:
    """Put one :class:`ActivationObserver` on each distinct input of ``linears``, collecting
    each input's Hessian too when given the ``hessian_dtype`` its values are rounded to
    (``GPTQConfig.hessian_dtype``)."""
    if find_probes(graph_module, ActivationObserver):
        return PassResult(graph_module, modified=False, report={"observers": 0, "note": "observers already present"})
    by_input: dict[str, list[fx.Node]] = {}
    for site in linears:
        linear = find_node(graph_module, site.node)
        if linear is None:
            raise PreconditionError(f"linear node {site.node} ({site.module_path}) is not in the graph")
        by_input.setdefault(site.input_node, []).append(linear)
    for index, (input_name, linear_nodes) in enumerate(by_input.items()):
        input_node = linear_nodes[0].args[0]
        if not isinstance(input_node, fx.Node) or input_node.name != input_name:
            raise PreconditionError(f"linear {linear_nodes[0].name} no longer reads {input_name}: stale linear sites")
        observer = ActivationObserver(input_name, [n.name for n in linear_nodes], hessian_dtype)
        insert_probe(graph_module, input_node, linear_nodes, observer, f"{_OBSERVER_PREFIX}{index}")
    graph_module.recompile()
    return PassResult(graph_module, modified=bool(by_input), report={"observers": len(by_input)})


def read_activation_stats(graph_module: fx.GraphModule) -> ActivationStats:
    """Read the observers out into frozen statistics keyed by linear node name."""
    per_linear: dict[str, ChannelStats] = {}
    for _, observer in find_probes(graph_module, ActivationObserver):
        if observer.channel_absmax is None:
            raise CalibrationError(
                f"observer of {observer.input_node} (feeding {', '.join(observer.linears)}) saw no data: "
                "run calibration batches through the graph first"
            )
        gram = observer.input_gram
        hessian = None if gram is None else symmetric_from_upper(gram).div_(observer.num_tokens)
        stats = ChannelStats(observer.input_node, observer.channel_absmax.clone(), observer.num_tokens, hessian)
        for linear in observer.linears:
            per_linear[linear] = stats
    return ActivationStats(per_linear)


def remove_observers(graph_module: fx.GraphModule) -> PassResult:
    """Take every observer out of the graph and the module tree."""
    removed = remove_probes(graph_module, ActivationObserver)
    return PassResult(graph_module, modified=bool(removed), report={"observers_removed": removed})
