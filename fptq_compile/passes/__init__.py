"""The compiler's passes, one per module. Analysis returns data; transforms edit graphs."""

from __future__ import annotations

from fptq_compile.passes.analyze_sensitivity import analyze_sensitivity, find_fold_target
from fptq_compile.passes.base import Pass, PassResult, run_pass
from fptq_compile.passes.fold_log_equalization import fold_log_equalization
from fptq_compile.passes.gptq_weights import gptq_weights
from fptq_compile.passes.insert_observers import (
    ActivationObserver,
    ActivationStats,
    ChannelStats,
    insert_observers,
    read_activation_stats,
    remove_observers,
)
from fptq_compile.passes.insert_w4a8_qdq import insert_w4a8_qdq
from fptq_compile.passes.quantize_kv_cache import quantize_kv_cache

__all__ = [
    "ActivationObserver",
    "ActivationStats",
    "ChannelStats",
    "Pass",
    "PassResult",
    "analyze_sensitivity",
    "find_fold_target",
    "fold_log_equalization",
    "gptq_weights",
    "insert_observers",
    "insert_w4a8_qdq",
    "quantize_kv_cache",
    "read_activation_stats",
    "remove_observers",
    "run_pass",
]
