"""What every pass returns, and the small runner that calls passes in a pipeline."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from fptq_compile.errors import FptqError, PassError
from fptq_compile.plan import QuantPlan


@dataclass(frozen=True)
class PassResult:
    """The graph a pass produced, whether it changed anything, and what it did."""

    graph_module: fx.GraphModule
    modified: bool
    report: Mapping[str, Any] = field(default_factory=dict)


Pass = Callable[[fx.GraphModule, QuantPlan], PassResult]
"""A transform pass: reads the plan, edits the graph, says honestly whether it did."""


def pass_name(transform: Callable[..., Any]) -> str:
    """The pass's function name (also through ``functools.partial``, which binds a pass's data)."""
    function = transform.func if isinstance(transform, functools.partial) else transform
    return getattr(function, "__name__", type(function).__name__)


def run_pass(transform: Pass, graph_module: fx.GraphModule, plan: QuantPlan, recompile: bool = True) -> PassResult:
    """Run one pass; name it in any error; drop the nodes it left unused and (with
    ``recompile``) lint and recompile the graph it changed. A caller running many passes on
    one big graph recompiles once at the end instead."""
    name = pass_name(transform)
    try:
        result = transform(graph_module, plan)
    except FptqError as error:
        raise type(error)(f"[{name}] {error}") from error
    except Exception as error:  # an unexpected failure: keep the cause, name the pass
        raise PassError(f"[{name}] failed: {type(error).__name__}: {error}") from error
    if not isinstance(result, PassResult):
        raise PassError(f"[{name}] returned {type(result).__name__}, expected PassResult")
    if result.modified:
        result.graph_module.graph.eliminate_dead_code()
        if recompile:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
    return result
