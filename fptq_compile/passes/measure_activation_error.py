"""Measure the int8 error of every activation group on calibration data (for the report).

Analysis only, with temporary probes, like :mod:`insert_observers`:

Before: ``linear(x, w)``, ``linear(x, w2)``
After:  ``x_seen = probe(x)``; ``linear(x_seen, w)``, ``linear(x_seen, w2)``

Run on the float graph after planning and before any transform, so each group's error is
its own, not compounded by the quantization of earlier layers. For each group the probe
quantizes and dequantizes X as the plan says (divided by its LAE scale first under
``lae_static``) and, for comparison, as the two plain alternatives: per-tensor static with
the calibrated max|X|, and per-token dynamic. It accumulates signal and noise energy over
the batches it sees; SQNR = 10·log10(Σ x² / Σ (x − qdq(x))²), in the domain that is
quantized (the equalized one under LAE). Groups the plan keeps float get only the
alternatives. Postcondition of :func:`remove_error_probes`: no probe is left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from fptq_compile import primitives
from fptq_compile.errors import CalibrationError, PreconditionError
from fptq_compile.graph_utils import find_node, find_probes, insert_probe, remove_probes
from fptq_compile.passes.base import PassResult
from fptq_compile.plan import ActivationClass, ActivationGroup, QuantPlan

_PROBE_PREFIX = "fptq_error_probe_"
PLANNED, STATIC, DYNAMIC = "planned", "static", "dynamic"


def _static_qdq(x: torch.Tensor, scale: float) -> torch.Tensor:
    codes = primitives.quantize_symmetric(x, scale, primitives.INT8_MIN, primitives.INT8_MAX)
    return primitives.dequantize(codes, scale)


def _dynamic_qdq(x: torch.Tensor) -> torch.Tensor:
    return primitives.dequantize(*primitives.quantize_per_token(x))


class ActivationErrorProbe(nn.Module):
    """Passes its input through and accumulates the quantization noise of each candidate."""

    def __init__(self, group: ActivationGroup) -> None:
        super().__init__()
        self.group = group
        self.static_scale = float(primitives.int8_scale_from_absmax(group.activation_absmax))
        self.lae_scale = None if group.lae_scale is None else torch.tensor(group.lae_scale, dtype=torch.float32)
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def _accumulate(self, candidate: str, reference: torch.Tensor, approximation: torch.Tensor) -> None:
        reference = reference.to(torch.float64)
        self.signal[candidate] = self.signal.get(candidate, 0.0) + float(reference.square().sum())
        noise = float((reference - approximation.to(torch.float64)).square().sum())
        self.noise[candidate] = self.noise.get(candidate, 0.0) + noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.detach().to(torch.float32)
        self._accumulate(STATIC, values, _static_qdq(values, self.static_scale))
        self._accumulate(DYNAMIC, values, _dynamic_qdq(values))
        planned = self.group.activation
        if planned.kind is ActivationClass.DYNAMIC:
            self._accumulate(PLANNED, values, _dynamic_qdq(values))
        elif planned.scale is not None:
            quantized = values if self.lae_scale is None else values / self.lae_scale
            self._accumulate(PLANNED, quantized, _static_qdq(quantized, planned.scale))
        return x

    def sqnr_db(self) -> dict[str, float]:
        return {name: _sqnr_db(self.signal[name], self.noise[name]) for name in self.signal}


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


@dataclass(frozen=True)
class ActivationErrors:
    """Per activation group (keyed by its input node): SQNR in dB of ``planned``, ``static``, ``dynamic``."""

    sqnr_db: Mapping[str, Mapping[str, float]]


def insert_error_probes(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Put one :class:`ActivationErrorProbe` on the input of each activation group of ``plan``."""
    if find_probes(graph_module, ActivationErrorProbe):
        return PassResult(graph_module, modified=False, report={"probes": 0, "note": "probes already present"})
    # Match every group to the graph before the first edit: a refused plan leaves it as it was.
    sites = []
    for group in plan.groups:
        source = find_node(graph_module, group.input_node)
        readers = [node for name in group.linears if (node := find_node(graph_module, name)) is not None]
        if source is None or len(readers) != len(group.linears) or any(source not in r.args for r in readers):
            raise PreconditionError(
                f"group {group.input_node} (feeding {', '.join(group.linears)}) does not match the graph: "
                "measure errors on the graph the plan was made from, before any transform"
            )
        sites.append((source, readers, group))
    for index, (source, readers, group) in enumerate(sites):
        insert_probe(graph_module, source, readers, ActivationErrorProbe(group), f"{_PROBE_PREFIX}{index}")
    graph_module.recompile()
    return PassResult(graph_module, modified=bool(plan.groups), report={"probes": len(plan.groups)})


def read_activation_errors(graph_module: fx.GraphModule) -> ActivationErrors:
    """The SQNR each probe measured, keyed by activation group."""
    errors = {}
    for _, probe in find_probes(graph_module, ActivationErrorProbe):
        if not probe.signal:
            raise CalibrationError(f"error probe of {probe.group.input_node} saw no data: run batches through it first")
        errors[probe.group.input_node] = probe.sqnr_db()
    return ActivationErrors(errors)


def remove_error_probes(graph_module: fx.GraphModule) -> PassResult:
    """Take every error probe out of the graph and the module tree."""
    removed = remove_probes(graph_module, ActivationErrorProbe)
    return PassResult(graph_module, modified=bool(removed), report={"probes_removed": removed})
