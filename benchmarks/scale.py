"""Compile and export synthetic Llama models bigger than SmolLM2 with their blocks on disk.

For each size (``--sizes``, default 0.5b 1.1b 3b) a Llama with random weights is written
once as safetensors shards (``--models``, default /tmp/fptq-scale-models, reused across
runs). Then, each step in a process of its own (so that its peak RSS is its own): the
model is loaded with its blocks on disk (:func:`fptq_compile.offload.load_offloaded`),
calibrated and quantized block by block on 4 random-token sequences of 128 tokens (the
default W4A8 config: error-driven policy, GPTQ, searched clipping; ``--rounding nearest``:
round-to-nearest codes) and exported to ONNX (``ort`` layout, external data); then ONNX
Runtime loads the export and runs one forward pass. Prints, per size, the parameters, the
fp32 size, the seconds per step, the peak RSS of compile + export and of ONNX Runtime, and
the compile peak divided by the fp32 size; writes JSON (default
benchmarks/results/scale.json).

    python benchmarks/scale.py [--sizes 0.5b 1.1b 3b] [--rounding gptq|nearest] [--models DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {
    # hidden, intermediate, layers, attention heads, key/value heads (vocabulary 32000)
    "0.5b": (1024, 4096, 24, 16, 16),
    "1.1b": (2048, 5632, 22, 32, 4),  # TinyLlama's shape
    "3b": (3200, 8640, 26, 32, 32),  # OpenLLaMA-3B's shape
}
VOCABULARY = 32000
SHARD_BYTES = 1 << 30


def llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    return LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def write_checkpoint(size: str, folder: Path) -> None:
    """A random-weight Llama of ``size`` as safetensors shards of ~1 GB, written one tensor at
    a time (never the whole model in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, parameter in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.rand(parameter.shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(parameter.shape, generator=generator)
        shard[name] = tensor
        total += tensor.numel() * tensor.element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(staging)
    staging.rename(folder)


def compile_one(folder: Path, output: Path, rounding: str) -> dict[str, object]:
    """Load ``folder`` offloaded, compile it and export it to ``output``: the figures of one
    row (run in its own process)."""
    import torch

    import fptq_compile as fptq
    from fptq_compile.exporters.onnx_qdq import OnnxLayout, export_onnx
    from fptq_compile.offload import load_offloaded

    config = json.loads((folder / "config.json").read_text())
    start = time.perf_counter()
    loaded = load_offloaded(folder)
    load_seconds = time.perf_counter() - start
    rss_after_load = _peak_rss()
    parameters = sum(p.numel() for p in loaded.model.parameters())
    token_ids = torch.randint(0, config["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    weights = fptq.WeightConfig(rounding=fptq.WeightRounding(rounding))
    config = fptq.CompileConfig(calibrate_by_block=True, weights=weights)
    compiled = fptq.compile(loaded, token_ids, config, progress=False, offload_folder=output / "blocks")
    compile_seconds = time.perf_counter() - start
    rss_after_compile = _peak_rss()
    start = time.perf_counter()
    export = export_onnx(compiled, output / "onnx" / "model.onnx", OnnxLayout.ORT)
    export_seconds = time.perf_counter() - start
    return {
        "parameters": parameters,
        "fp32_bytes": parameters * 4,
        "load_seconds": round(load_seconds, 1),
        "compile_seconds": round(compile_seconds, 1),
        "export_seconds": round(export_seconds, 1),
        "compile_steps": compiled.report.seconds_per_step,
        "plan": compiled.plan.activation_class_counts(),
        "onnx_bytes": export.file_bytes,
        "peak_rss_after_load_bytes": rss_after_load,
        "peak_rss_after_compile_bytes": rss_after_compile,
        "peak_rss_bytes": _peak_rss(),
    }


def run_onnx(path: Path) -> dict[str, object]:
    """Load the exported model in ONNX Runtime and run one forward pass (prefill of 2 x 16
    tokens on an empty cache): its load and run times and this process's peak RSS."""
    import torch

    from fptq_compile.runtime import OrtCausalLM

    start = time.perf_counter()
    session = OrtCausalLM.load(path)
    load_seconds = time.perf_counter() - start
    ids = torch.randint(0, VOCABULARY, (2, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    logits = session(ids)
    return {
        "ort_load_seconds": round(load_seconds, 1),
        "ort_forward_seconds": round(time.perf_counter() - start, 2),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "ort_peak_rss_bytes": _peak_rss(),
    }


def _in_own_process(size: str, *arguments: object) -> dict[str, object]:
    command = [sys.executable, __file__, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{size}: {arguments[0]} failed:\n{result.stderr[-3000:]}")
    row: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def _peak_rss() -> int:
    from fptq_compile.pipeline import peak_rss_bytes

    return peak_rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "fptq-scale-models")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "fptq-scale-output")
    parser.add_argument(
        "--rounding", choices=["gptq", "nearest"], default="gptq", help="int4 codes by GPTQ (default) or RTN"
    )
    # Internal: one step of one row in its own process, its figures printed as JSON.
    parser.add_argument("--compile-row", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-row", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_row is not None:
        print(json.dumps(compile_one(args.compile_row, args.output, args.rounding)))
        return
    if args.onnx_row is not None:
        print(json.dumps(run_onnx(args.onnx_row)))
        return

    rows = {}
    for size in args.sizes:
        folder = args.models / f"llama-{size}"
        if not folder.is_dir():
            args.models.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            write_checkpoint(size, folder)
            print(f"{size}: wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        output = args.output / size
        shutil.rmtree(output, ignore_errors=True)
        row = _in_own_process(size, "--compile-row", folder, "--output", output, "--rounding", args.rounding)
        row["rounding"] = args.rounding
        row.update(_in_own_process(size, "--onnx-row", output / "onnx" / "model.onnx"))
        row["peak_rss_per_fp32_byte"] = round(row["peak_rss_bytes"] / row["fp32_bytes"], 3)
        rows[size] = row
        print(
            f"{size:5s} {row['parameters'] / 1e9:5.2f} B params  fp32 {row['fp32_bytes'] / 2**30:5.1f} GiB  "
            f"load {row['load_seconds']:5.1f} s  compile {row['compile_seconds']:6.1f} s  "
            f"export {row['export_seconds']:6.1f} s  "
            f"peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB ({row['peak_rss_per_fp32_byte']:.3f} x fp32)  "
            f"ORT load+forward peak RSS {row['ort_peak_rss_bytes'] / 2**30:5.2f} GiB, "
            f"logits finite: {row['logits_finite']}  steps {row['compile_steps']}",
            flush=True,
        )
        # After every row: a run stopped part way keeps the sizes it finished.
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
