"""ONNX export time against model size: depth (decoder layers) and width (bytes per layer).

Issue 5 asks for export time linear in model size. Random-weight Llamas in memory (no
checkpoint), each compiled with round-to-nearest weights on one random-token sequence of
64 tokens, then exported with :func:`fptq_compile.exporters.export_onnx` in the ``ort``
layout (capture, lowering to ONNX, the ONNX Runtime fusions and their check, saving);
the export is timed alone, ``--repeats`` times, median kept.

- ``depth``: hidden 256 (intermediate 704, 8 heads, 4 key/value heads), 4 / 8 / 16 / 32
  layers: the graph's node count grows with the layers, the bytes stay small, so this row
  shows what the export costs per node (a rule quadratic in the node count shows as
  seconds per layer growing with the layers);
- ``width``: 4 layers, hidden 512 / 1024 / 2048 (intermediate 2.75x, 64-wide heads, a
  vocabulary of 4096): the node count is fixed, the bytes grow, so this row shows the
  cost per byte.

Prints each model's layers, parameters, ONNX bytes, export seconds, seconds per layer
(depth) or per 100 MB (width), and whether every timed export fused; writes JSON (default
benchmarks/results/export_scaling.json).

    python benchmarks/export_scaling.py [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEPTHS = (4, 8, 16, 32)
WIDTHS = (512, 1024, 2048)


def random_llama(hidden: int, layers: int, vocabulary: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = hidden // 64 if hidden >= 512 else 8
    config = LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def export_seconds(hidden: int, layers: int, vocabulary: int, repeats: int) -> dict[str, Any]:
    import torch

    import fptq_compile as fptq
    from fptq_compile.exporters import export_onnx

    model = random_llama(hidden, layers, vocabulary)
    config = fptq.CompileConfig(weights=fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST))
    calibration = torch.randint(0, vocabulary, (1, 64), generator=torch.Generator().manual_seed(0))
    compiled = fptq.compile(model, calibration, config, progress=False)
    seconds, onnx_bytes, fused = [], 0, True
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            result = export_onnx(compiled, Path(folder) / "model.onnx")
            seconds.append(time.perf_counter() - start)
            onnx_bytes = result.file_bytes
            # An unfused fallback is another export: every timed run must have fused.
            fused = fused and result.fusions is not None and not result.fusions.unfused_reason
    median = statistics.median(seconds)
    return {
        "hidden": hidden,
        "layers": layers,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "onnx_bytes": onnx_bytes,
        "fused": fused,
        "export_seconds": round(median, 2),
        "export_seconds_runs": [round(value, 2) for value in seconds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "export_scaling.json")
    args = parser.parse_args()

    results: dict[str, list[dict[str, Any]]] = {"depth": [], "width": []}
    for layers in DEPTHS:
        row = export_seconds(256, layers, 1024, args.repeats)
        row["seconds_per_layer"] = round(row["export_seconds"] / layers, 3)
        results["depth"].append(row)
        print(
            f"depth: {layers:3d} layers, {row['parameters'] / 1e6:7.1f} M parameters, "
            f"{row['onnx_bytes'] / 1e6:7.1f} MB: export {row['export_seconds']:6.2f} s "
            f"({row['seconds_per_layer']:.3f} s per layer; runs {row['export_seconds_runs']}; fused {row['fused']})",
            flush=True,
        )
    for hidden in WIDTHS:
        row = export_seconds(hidden, 4, 4096, args.repeats)
        row["seconds_per_100_mb"] = round(row["export_seconds"] / (row["onnx_bytes"] / 1e8), 3)
        results["width"].append(row)
        print(
            f"width: hidden {hidden:5d}, {row['parameters'] / 1e6:7.1f} M parameters, "
            f"{row['onnx_bytes'] / 1e6:7.1f} MB: export {row['export_seconds']:6.2f} s "
            f"({row['seconds_per_100_mb']:.3f} s per 100 MB; runs {row['export_seconds_runs']}; fused {row['fused']})",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
