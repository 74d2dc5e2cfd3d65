"""Calibration block by block: the statistics and candidate errors of whole-model calibration,
with one decoder block's calibration activations in flight at a time.

The model runs up to its first block once per batch (:func:`first_block_inputs`); then each
block, the one captured graph bound to its parameters, gets the observers and error probes
of whole-model calibration, runs the batches and hands its float outputs to the next block.
What the probes measured is keyed back by the whole graph's linear and input node names,
so the plan is made from it exactly as from whole-model calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fptq_compile.blocks import BlockCall, capture_block, check_blocks_share_inputs, find_blocks, first_block_inputs
from fptq_compile.blocks import run_block as run_bound_block
from fptq_compile.capture import LinearSite
from fptq_compile.config import CompileConfig
from fptq_compile.errors import UnsupportedGraphError
from fptq_compile.passes.analyze_sensitivity import activation_candidates
from fptq_compile.passes.insert_observers import (
    ActivationStats,
    ChannelStats,
    insert_observers,
    read_activation_stats,
    remove_observers,
)
from fptq_compile.passes.measure_activation_error import (
    ActivationErrors,
    insert_error_probes,
    read_activation_errors,
    remove_error_probes,
)


def calibrate_by_block(
    model: nn.Module,
    linears: Sequence[LinearSite],
    batches: Sequence[torch.Tensor],
    error_batches: Sequence[torch.Tensor],
    config: CompileConfig,
    collect_hessians: bool,
    progress: bool = True,
) -> tuple[ActivationStats, ActivationErrors | None]:
    """Statistics (and, with ``error_batches``, candidate errors) of ``linears``, sites of the
    whole captured graph, measured block by block on token-id ``batches``."""
    blocks = find_blocks(model)
    check_blocks_share_inputs(model, blocks, batches[0][:1])
    calls = first_block_inputs(model, blocks, batches)
    error_calls = first_block_inputs(model, blocks, error_batches)
    graph = capture_block(blocks, calls[0])
    by_path = {site.module_path: site for site in linears}
    hidden = [call[0][0] for call in calls]
    error_hidden = [call[0][0] for call in error_calls]
    stats: dict[str, ChannelStats] = {}
    errors: dict[str, dict[str, float]] = {}
    covered: set[str] = set()
    for index, layer in enumerate(tqdm(blocks.layers, desc="blocks", unit="block", disable=not progress)):
        bound = graph.bind(layer)
        # The block's linears that the whole graph quantizes, and their whole-graph sites.
        paths = {site.node: graph.module_path(blocks, index, site) for site in graph.linears}
        sites = [site for site in graph.linears if paths[site.node] in by_path]
        whole = {site.node: by_path[paths[site.node]] for site in sites}
        covered.update(site.module_path for site in whole.values())
        insert_observers(bound, sites, collect_hessians)
        hidden = _run(bound, calls, hidden)
        block_stats = read_activation_stats(bound)
        remove_observers(bound)
        for node, channel_stats in block_stats.per_linear.items():
            stats[whole[node].node] = dataclasses.replace(channel_stats, input_node=whole[node].input_node)
        if error_batches:
            insert_error_probes(bound, activation_candidates(bound, sites, block_stats, config))
            error_hidden = _run(bound, error_calls, error_hidden)
            block_errors = read_activation_errors(bound)
            remove_error_probes(bound)
            for site in sites:
                if site.input_node in block_errors.sqnr_db:
                    errors[whole[site.node].input_node] = dict(block_errors.sqnr_db[site.input_node])
    missing = sorted(set(by_path) - covered)
    if missing:
        raise UnsupportedGraphError(
            f"linears outside the decoder blocks ({', '.join(missing[:4])}) cannot be calibrated block by block: "
            "ignore them or calibrate the whole model"
        )
    return ActivationStats(stats), ActivationErrors(errors) if error_batches else None


def _run(bound: torch.fx.GraphModule, calls: Sequence[BlockCall], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block's float outputs for each batch (observers and probes pass their input through)."""
    with torch.no_grad():
        return [run_bound_block(bound, call, states) for call, states in zip(calls, hidden, strict=True)]
