"""Float ONNX vs W4A8 ONNX of SmolLM2-135M on ONNX Runtime CPU, side by side in one run.

Every model is exported by this project. The float baseline is the captured graph with no
transform pass, exported in the ``ort`` layout, so it gets the same attention, norm and
merged-MatMul fusions as the W4A8 model and the ratios measure quantization alone.
Models:

- ``float``: float32, ``ort`` layout;
- ``w4a8_ort``: the default compile (error-driven W4A8, int4 g128 asymmetric), ``ort`` layout;
- ``w4a8_qdq``: the same model in the portable ``qdq`` layout;
- ``w4a8_ort_lm_head_int8``: also ``lm_head`` as an int8 weight-only layer
  (``int8_weight_only=("lm_head",)``; the embedding table stays float32, and SmolLM2's head
  being tied to it, ONNX Runtime computes the head's int8 codes from it when the session
  starts, so the file holds no second copy).

W4A8 sessions run at accuracy level 1 (the fused int4 MatMuls compute in float: the torch
reference's numbers) and at ORT's default level 4 (int8 activations inside ``MatMulNBits``).
Every session runs as the project's runtime runs it (:class:`OrtCausalLM`): the ``ort``
models' cache is one buffer bound as past and present, which ORT appends to in place; the
``qdq`` model's past is copied into a new present each step. For each session: file size,
prefill latency (1 x 512 tokens, empty cache), decode latency per token (1 token against a
512-token cache; the median of 5 steps per round; for the ``ort`` models also with the
cache copied, through plain ``session.run``, for comparison), each the
median over ``--runs`` rounds taken round-robin across the sessions, the ratios to float
(of the medians, and the median of per-round ratios), and, for the ``ort`` sessions, the
ORT perplexity (quick mode) beside the torch reference's. Writes JSON (default
benchmarks/results/onnx_runtime.json).

    python benchmarks/onnx_runtime.py [--runs 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from protocol import calibration_text, wikitext_test_ids

import fptq_compile as fptq
from fptq_compile.capture import KVCache
from fptq_compile.evaluate import perplexity
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.runtime import OrtCausalLM, session_options

DECODE_STEPS = 5
# name -> (export, accuracy level 1?)
SESSIONS = {
    "float": ("float", True),
    "w4a8_ort": ("w4a8_ort", True),
    "w4a8_ort_level4": ("w4a8_ort", False),
    "w4a8_qdq": ("w4a8_qdq", True),
    "w4a8_ort_lm_head_int8": ("w4a8_ort_lm_head_int8", True),
    "w4a8_ort_lm_head_int8_level4": ("w4a8_ort_lm_head_int8", False),
}


def _session(path: Path, threads: int, exact: bool) -> ort.InferenceSession:
    options = session_options(threads, exact)
    # Round-robin over several sessions: a session's idle threads must not spin on the
    # cores the next session is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _copied_cache_feeds(model: OrtCausalLM, token: torch.Tensor, cache: KVCache) -> dict[str, np.ndarray]:
    """Feeds for one step through plain ``session.run``: ORT copies the past into a new present."""
    feeds = {"input_ids": token.numpy(), "attention_mask": np.ones((1, cache[0][0].shape[2] + 1), np.int64)}
    for layer, (key, value) in enumerate(cache):
        feeds[f"past_key_values.{layer}.key"] = np.ascontiguousarray(key.numpy())
        feeds[f"past_key_values.{layer}.value"] = np.ascontiguousarray(value.numpy())
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows (quick mode: 40)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "onnx_runtime.json")
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    loaded = fptq.load_model()
    calibration = calibration_text()
    compiled = {
        "w4a8": fptq.compile(loaded, calibration, progress=False),
        "w4a8_lm_head_int8": fptq.compile(
            loaded, calibration, fptq.CompileConfig(int8_weight_only=("lm_head",)), progress=False
        ),
        "float": fptq.compile(loaded, fptq.RandomTokens(), passes=(), num_samples=1, seq_len=8, progress=False),
    }
    eval_ids = wikitext_test_ids(loaded.tokenizer)
    torch_perplexity = {
        name: perplexity(compiled[name], eval_ids, max_windows=args.windows, progress=False).perplexity
        for name in ("w4a8", "w4a8_lm_head_int8")
    }

    folder = Path(tempfile.mkdtemp(prefix="fptq-bench-"))
    exports = {
        "float": export_onnx(compiled["float"], folder / "float.onnx", OnnxLayout.ORT),
        "w4a8_ort": export_onnx(compiled["w4a8"], folder / "w4a8_ort.onnx", OnnxLayout.ORT),
        "w4a8_qdq": export_onnx(compiled["w4a8"], folder / "w4a8_qdq.onnx", OnnxLayout.QDQ),
        "w4a8_ort_lm_head_int8": export_onnx(
            compiled["w4a8_lm_head_int8"], folder / "w4a8_lm_head_int8.onnx", OnnxLayout.ORT
        ),
    }
    # Each model as the project's runtime runs it (OrtCausalLM: a fused model's cache is one
    # shared buffer that ORT appends to in place; the qdq layout's is copied every step).
    sessions = {
        name: OrtCausalLM.from_session(_session(exports[export].path, args.threads, exact), name)
        for name, (export, exact) in SESSIONS.items()
    }

    layout = compiled["w4a8"].kv_layout
    prompt = torch.randint(0, loaded.model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([[42]])
    prefill: dict[str, list[float]] = {name: [] for name in sessions}
    decode: dict[str, list[float]] = {name: [] for name in sessions}
    decode_copied: dict[str, list[float]] = {name: [] for name in sessions}
    caches = {}
    for name, session in sessions.items():  # warm-up, and the 512-token cache each decodes against
        caches[name] = session.step(prompt, layout.empty(1))[1]
    for _ in range(args.runs):
        for name, session in sessions.items():  # round-robin: drift hits every model alike
            start = time.perf_counter()
            session.step(prompt, layout.empty(1))
            prefill[name].append(time.perf_counter() - start)
            if session.shared_buffer:
                # The prefill above started a new buffer: copy the 512-token cache into one
                # with room for the step, outside the timing (the steps then run in place).
                grown = session.step(token, caches[name])[1]
                caches[name] = [(key[:, :, :512], value[:, :, :512]) for key, value in grown]
            steps = []
            for _ in range(DECODE_STEPS):
                start = time.perf_counter()
                session.step(token, caches[name])
                steps.append(time.perf_counter() - start)
            decode[name].append(statistics.median(steps))
            if session.shared_buffer:  # the same step with the cache copied (plain session.run)
                feeds = _copied_cache_feeds(session, token, caches[name])
                steps = []
                for _ in range(DECODE_STEPS):
                    start = time.perf_counter()
                    session.session.run(None, feeds)
                    steps.append(time.perf_counter() - start)
                decode_copied[name].append(statistics.median(steps))

    results = {}
    for name, (export_name, exact) in SESSIONS.items():
        export = exports[export_name]
        row: dict[str, object] = {
            "file_mb": round(export.file_bytes / 1e6, 1),
            "size_ratio": round(export.file_bytes / exports["float"].file_bytes, 3),
            "accuracy_level": None if name == "float" else (1 if exact else 4),
        }
        for label, times in (("prefill", prefill), ("decode", decode)):
            row[f"{label}_ms_median"] = round(1e3 * statistics.median(times[name]), 2)
            row[f"{label}_ratio"] = round(statistics.median(times[name]) / statistics.median(times["float"]), 3)
            paired = [mine / base for mine, base in zip(times[name], times["float"], strict=True)]
            row[f"{label}_ratio_paired"] = round(statistics.median(paired), 3)
        if decode_copied[name]:
            row["decode_copied_cache_ms_median"] = round(1e3 * statistics.median(decode_copied[name]), 2)
            row["decode_copied_cache_ratio"] = round(
                statistics.median(decode_copied[name]) / statistics.median(decode_copied["float"]), 3
            )
        results[name] = row
    for name in ("w4a8_ort", "w4a8_ort_level4", "w4a8_ort_lm_head_int8_level4"):
        export_name, exact = SESSIONS[name]
        source = "w4a8_lm_head_int8" if "lm_head" in name else "w4a8"
        session = OrtCausalLM.load(exports[export_name].path, threads=args.threads, exact=exact)
        measured = perplexity(session, eval_ids, max_windows=args.windows, progress=False).perplexity
        reference = torch_perplexity[source]
        results[name]["perplexity_torch"] = round(reference, 3)
        results[name]["perplexity_ort"] = round(measured, 3)
        results[name]["perplexity_gap_percent"] = round(100 * (measured / reference - 1), 3)

    for name, row in results.items():
        copied = (
            f" | cache copied {row['decode_copied_cache_ms_median']:>6.2f} ms ({row['decode_copied_cache_ratio']:.3f}x)"
            if "decode_copied_cache_ms_median" in row
            else ""
        )
        gap = (
            f" | PPL torch {row['perplexity_torch']} -> ORT {row['perplexity_ort']}" if "perplexity_ort" in row else ""
        )
        print(
            f"{name:<30} {row['file_mb']:>6.1f} MB ({row['size_ratio']:.3f}x) | prefill 1x512 "
            f"{row['prefill_ms_median']:>7.1f} ms ({row['prefill_ratio']:.3f}x, "
            f"paired {row['prefill_ratio_paired']:.3f}x)"
            f" | decode @512 {row['decode_ms_median']:>6.2f} ms ({row['decode_ratio']:.3f}x, paired "
            f"{row['decode_ratio_paired']:.3f}x){copied} | level {row['accuracy_level'] or '-'}{gap}"
        )
    linear = compiled["w4a8"].report.linear_weight_bytes
    summary = {
        "runs": args.runs,
        "threads": args.threads,
        "decode_steps_per_round": DECODE_STEPS,
        "perplexity_windows": args.windows,
        "onnxruntime": ort.__version__,
        "models": results,
        "fusions": {name: vars(export.fusions) for name, export in exports.items() if export.fusions is not None},
        "linear_weight_bytes": linear,
        "linear_weight_ratio": round(linear["compiled"] / linear["float32"], 4),
    }
    print(
        f"decoder linears: {linear['compiled'] / 1e6:.1f} MB int4 + scales vs {linear['float32'] / 1e6:.1f} MB fp32 "
        f"({summary['linear_weight_ratio']:.3f}x)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
