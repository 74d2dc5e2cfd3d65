"""Measure, on calibration data, the int8 error of each way to quantize each activation group.

Analysis only, with temporary probes, like :mod:`insert_observers`:

Before: ``linear(x, w)``, ``linear(x, w2)``
After:  ``x_seen = probe(x)``; ``linear(x_seen, w)``, ``linear(x_seen, w2)``

Run on the float graph before planning: each group's candidates (per-tensor static with
the calibrated max|X| or a clipped scale, LAE + static, per-token dynamic; see
:func:`fptq_compile.passes.analyze_sensitivity.activation_candidates`) are measured on the
same activations, so they compare fairly, and no group's error is compounded by the
quantization of earlier layers. Each probe quantizes and dequantizes X as each candidate
says and accumulates signal and noise energy over the batches it sees; SQNR =
10·log10(Σ x² / Σ (x − x̂)²), always in X's own domain (under LAE, x̂ = qdq(x / s)·s), so
candidates are comparable. Postcondition of :func:`remove_error_probes`: no probe is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from fptq_compile import primitives
from fptq_compile.errors import CalibrationError, PreconditionError
from fptq_compile.graph_utils import find_node, find_probes, insert_probe, remove_probes
from fptq_compile.passes.base import PassResult

_PROBE_PREFIX = "fptq_error_probe_"


@dataclass(frozen=True)
class Candidate:
    """One way to quantize a group's input: per-token dynamic (``scale`` None) or per-tensor
    static with ``scale``, applied after dividing by ``lae_scale`` when there is one."""

    scale: float | None = None
    lae_scale: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GroupCandidates:
    """The candidates to measure for the linears reading ``input_node``."""

    input_node: str
    linears: tuple[str, ...]
    candidates: Mapping[str, Candidate]


@dataclass(frozen=True)
class ActivationErrors:
    """Per activation group (keyed by its input node): SQNR in dB of each candidate, by name."""

    sqnr_db: Mapping[str, Mapping[str, float]]


def _quantize_dequantize(
    x: torch.Tensor, candidate: Candidate, lae_scale: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``x`` quantized to int8 and restored as ``candidate`` says, written into ``out``."""
    if candidate.scale is None:
        return primitives.fake_quantize_int8(x, primitives.per_token_scale(x), out=out)
    if lae_scale is None:
        return primitives.fake_quantize_int8(x, candidate.scale, out=out)
    equalized = torch.div(x, lae_scale, out=out)
    return primitives.fake_quantize_int8(equalized, candidate.scale, out=out).mul_(lae_scale)


class ActivationErrorProbe(nn.Module):
    """Passes its input through and accumulates each candidate's quantization noise."""

    def __init__(self, group: GroupCandidates) -> None:
        super().__init__()
        self.group = group
        self.lae_scales = {
            name: torch.tensor(candidate.lae_scale, dtype=torch.float32)
            for name, candidate in group.candidates.items()
            if candidate.lae_scale is not None
        }
        self.signal = 0.0
        self.noise = dict.fromkeys(group.candidates, 0.0)
        self.num_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.detach().to(torch.float32)
        # Every candidate on one float32 scratch tensor: (restored - x)^2 in place, summed.
        scratch = torch.square(values)
        self.signal += primitives.energy(scratch)
        self.num_tokens += values.numel() // values.shape[-1]
        for name, candidate in self.group.candidates.items():
            restored = _quantize_dequantize(values, candidate, self.lae_scales.get(name), scratch)
            self.noise[name] += primitives.energy(restored.sub_(values).square_())
        return x

    def sqnr_db(self) -> dict[str, float]:
        return {name: primitives.energy_sqnr_db(self.signal, noise) for name, noise in self.noise.items()}


def insert_error_probes(graph_module: fx.GraphModule, groups: Sequence[GroupCandidates]) -> PassResult:
    """Put one :class:`ActivationErrorProbe` on the input of each group."""
    if find_probes(graph_module, ActivationErrorProbe):
        return PassResult(graph_module, modified=False, report={"probes": 0, "note": "probes already present"})
    # Match every group to the graph before the first edit: a refused request leaves it as it was.
    sites = []
    for group in groups:
        source = find_node(graph_module, group.input_node)
        readers = [node for name in group.linears if (node := find_node(graph_module, name)) is not None]
        if source is None or len(readers) != len(group.linears) or any(source not in r.args for r in readers):
            raise PreconditionError(
                f"group {group.input_node} (feeding {', '.join(group.linears)}) does not match the graph: "
                "measure errors on the float graph the linears were found in, before any transform"
            )
        sites.append((source, readers, group))
    for index, (source, readers, group) in enumerate(sites):
        insert_probe(graph_module, source, readers, ActivationErrorProbe(group), f"{_PROBE_PREFIX}{index}")
    graph_module.recompile()
    return PassResult(graph_module, modified=bool(groups), report={"probes": len(groups)})


def read_activation_errors(graph_module: fx.GraphModule) -> ActivationErrors:
    """The SQNR each probe measured, keyed by activation group."""
    errors = {}
    for _, probe in find_probes(graph_module, ActivationErrorProbe):
        if probe.num_tokens == 0:
            raise CalibrationError(f"error probe of {probe.group.input_node} saw no data: run batches through it first")
        errors[probe.group.input_node] = probe.sqnr_db()
    return ActivationErrors(errors)


def remove_error_probes(graph_module: fx.GraphModule) -> PassResult:
    """Take every error probe out of the graph and the module tree."""
    removed = remove_probes(graph_module, ActivationErrorProbe)
    return PassResult(graph_module, modified=bool(removed), report={"probes_removed": removed})
