"""Plug your own pass into the pipeline, and drop one.

A pass is a plain function ``(graph_module, plan) -> PassResult``. This example adds a
pass that keeps the activations of chosen layers float (a transform), another that only
counts what the pipeline produced (an analysis: ``modified=False``), and compiles once
without LAE.

    python examples/custom_pass.py
"""

from __future__ import annotations

import collections
import operator

import torch
from torch import fx

import fptq_compile as fptq
from fptq_compile.passes import PassResult, insert_w4a8_qdq
from fptq_compile.plan import QuantPlan

fptq_ops = torch.ops.fptq


def count_fptq_ops(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Analysis pass: how many of each fptq op the graph holds. Changes nothing."""
    counts = collections.Counter(
        str(node.target) for node in graph_module.graph.nodes if str(node.target).startswith("fptq.")
    )
    return PassResult(graph_module, modified=False, report=dict(counts))


def float_inputs_for_last_layer(graph_module: fx.GraphModule, plan: QuantPlan) -> PassResult:
    """Transform pass: the last decoder layer's linears read float activations again."""
    last_layer = max(int(layer.module_path.split(".")[2]) for layer in plan.layers)
    restored = 0
    for node in graph_module.graph.nodes:
        layer = plan.layer(node.name)
        if layer is None or not layer.module_path.startswith(f"model.layers.{last_layer}."):
            continue
        dequantized = node.args[0]
        if dequantized.target in (fptq_ops.dequantize_per_tensor.default, fptq_ops.dequantize_per_token.default):
            codes = dequantized.args[0]
            quantize = codes.args[0] if codes.target is operator.getitem else codes
            node.replace_input_with(dequantized, quantize.args[0])
            restored += 1
    return PassResult(graph_module, modified=restored > 0, report={"restored_inputs": restored})


loaded = fptq.load_model()
calibration = fptq.RandomTokens()
# Data-free calibration, so round-to-nearest weights (GPTQ wants text calibration).
nearest = fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST)

compiled = fptq.compile(
    loaded,
    calibration,
    fptq.CompileConfig(weights=nearest),
    num_samples=8,
    seq_len=128,
    passes=[*fptq.DEFAULT_PASSES, float_inputs_for_last_layer, count_fptq_ops],
)
reports = compiled.report.pass_reports
print("with custom passes:", reports["float_inputs_for_last_layer"], reports["count_fptq_ops"])

# Dropping LAE: the plan must not ask for it (insert_w4a8_qdq refuses an unfolded LAE group).
no_lae = fptq.CompileConfig(weights=nearest, activations=fptq.ActivationConfig(use_lae=False))
compiled = fptq.compile(loaded, calibration, no_lae, num_samples=8, seq_len=128, passes=[insert_w4a8_qdq])
print("without LAE:", compiled.plan.summary()["linears_per_activation_class"], list(compiled.report.pass_reports))
