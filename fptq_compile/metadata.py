"""The one node-metadata key fptq_compile writes, and its two accessors.

Passes tag the linear nodes they rewrite so that later passes (and a second run of the
same pass) can see what was done: ``node.meta["fptq"]`` holds one :class:`LinearState`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import fx

META_KEY = "fptq"


@dataclass(frozen=True)
class LinearState:
    """What the passes have done to one linear node."""

    lae_folded: bool = False
    weight_quantized: bool = False
    """The weight already reads int4 groups (GPTQ ran); the activation may still be float."""
    quantized: bool = False


def get_linear_state(node: fx.Node) -> LinearState:
    """The node's state; a node no pass has touched gets the default (nothing done)."""
    state = node.meta.get(META_KEY)
    return state if isinstance(state, LinearState) else LinearState()


def update_linear_state(node: fx.Node, **changes: bool) -> None:
    """Record what a pass did to a linear node (fields of :class:`LinearState`)."""
    node.meta[META_KEY] = dataclasses.replace(get_linear_state(node), **changes)
