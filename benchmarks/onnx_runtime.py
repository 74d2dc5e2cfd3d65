"""Float ONNX vs W4A8 ONNX of SmolLM2-135M on ONNX Runtime CPU, side by side in one run.

For the float export (the captured graph, no transform pass) and the W4A8 export in both
layouts (``ort``: int4 [K, N] fused into MatMulNBits; ``qdq``: portable [N, K]), prints:
file size, prefill latency (1 x 512 tokens, empty cache) and decode latency per token
(1 token against a 512-token cache), each the median of several runs taken round-robin
across the models, and ratios W4A8 / float. One more W4A8 model also quantizes the tied
``lm_head`` (not the default: ``include=("*.[0-9]*", "lm_head")``; the embedding stays
float32), with its quick-mode perplexity beside the default's, since every decode step
of the default still reads the 113 MB float32 ``lm_head``. W4A8 sessions use accuracy level 1 (exact,
the torch reference's numbers) and, separately, ORT's default level 4 (int8 activations
inside MatMulNBits). Writes JSON (default benchmarks/results/onnx_runtime.json).

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

import fptq_compile as fptq
from fptq_compile.evaluate import perplexity, wikitext_token_ids
from fptq_compile.exporters import OnnxLayout, export_onnx
from fptq_compile.runtime import session_options

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _feeds(session: ort.InferenceSession, input_ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return {"input_ids": input_ids, **dict(zip(names[1:], past, strict=True))}


def _session(path: Path, threads: int, exact: bool) -> ort.InferenceSession:
    options = session_options(threads, exact)
    # Round-robin over several sessions: a session's idle threads must not spin on the
    # cores the next session is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "onnx_runtime.json")
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    loaded = fptq.load_model()
    lines = (DATA / "wikitext-2-tokenized" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    compiled = fptq.compile(loaded, fptq.Texts(tuple(lines), separator=" "), progress=False)
    calibration = fptq.Texts(tuple(lines), separator=" ")
    with_lm_head = fptq.compile(
        loaded, calibration, fptq.CompileConfig(include=("*.[0-9]*", "lm_head")), progress=False
    )
    float_graph = fptq.compile(loaded, fptq.RandomTokens(), passes=(), num_samples=1, seq_len=8, progress=False)
    eval_ids = wikitext_token_ids(DATA / "wikitext-2-raw" / "wiki.test.raw", loaded.tokenizer)
    perplexities = {
        "w4a8_ort": perplexity(compiled, eval_ids, max_windows=40, progress=False).perplexity,
        "w4a8_ort_lm_head_int4": perplexity(with_lm_head, eval_ids, max_windows=40, progress=False).perplexity,
    }

    folder = Path(tempfile.mkdtemp(prefix="fptq-bench-"))
    exports = {
        "float": export_onnx(float_graph, folder / "float.onnx", OnnxLayout.QDQ),
        "w4a8_ort": export_onnx(compiled, folder / "w4a8_ort.onnx", OnnxLayout.ORT),
        "w4a8_qdq": export_onnx(compiled, folder / "w4a8_qdq.onnx", OnnxLayout.QDQ),
        "w4a8_ort_lm_head_int4": export_onnx(with_lm_head, folder / "w4a8_lm_head.onnx", OnnxLayout.ORT),
    }
    sessions = {
        "float": (exports["float"], True),
        "w4a8_ort": (exports["w4a8_ort"], True),
        "w4a8_ort_level4": (exports["w4a8_ort"], False),
        "w4a8_qdq": (exports["w4a8_qdq"], True),
        "w4a8_ort_lm_head_int4": (exports["w4a8_ort_lm_head_int4"], True),
    }
    loaded_sessions = {name: _session(export.path, args.threads, exact) for name, (export, exact) in sessions.items()}
    layout = compiled.kv_layout
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, loaded.model.config.vocab_size, (1, 512)).astype(np.int64)
    empty = [np.zeros((1, layout.num_kv_heads, 0, layout.head_dim), np.float32)] * (2 * layout.num_layers)
    prefill_times: dict[str, list[float]] = {name: [] for name in loaded_sessions}
    decode_times: dict[str, list[float]] = {name: [] for name in loaded_sessions}
    caches = {}
    for name, session in loaded_sessions.items():  # warm-up, and the 512-token cache each decodes against
        caches[name] = session.run(None, _feeds(session, prompt, empty))[1:]
    token = np.array([[42]], dtype=np.int64)
    for _ in range(args.runs):
        for name, session in loaded_sessions.items():  # round-robin: drift hits every model alike
            start = time.perf_counter()
            session.run(None, _feeds(session, prompt, empty))
            prefill_times[name].append(time.perf_counter() - start)
            feeds = _feeds(session, token, caches[name])
            start = time.perf_counter()
            session.run(None, feeds)
            decode_times[name].append(time.perf_counter() - start)

    results = {}
    for name, (export, exact) in sessions.items():
        results[name] = {
            "file_mb": round(export.file_bytes / 1e6, 1),
            "accuracy_level": None if name == "float" else (1 if exact else 4),
            "prefill_ms_median": round(1e3 * statistics.median(prefill_times[name]), 2),
            "decode_ms_median": round(1e3 * statistics.median(decode_times[name]), 2),
        }
        if name in perplexities:
            results[name]["torch_perplexity_quick"] = round(perplexities[name], 3)
    base = results["float"]
    for name, row in results.items():
        row["size_ratio"] = round(row["file_mb"] / base["file_mb"], 3)
        row["prefill_ratio"] = round(row["prefill_ms_median"] / base["prefill_ms_median"], 3)
        row["decode_ratio"] = round(row["decode_ms_median"] / base["decode_ms_median"], 3)
        print(
            f"{name:<16} {row['file_mb']:>7.1f} MB ({row['size_ratio']:.3f}x) | prefill 1x512 "
            f"{row['prefill_ms_median']:>8.1f} ms ({row['prefill_ratio']:.3f}x) | decode @512 "
            f"{row['decode_ms_median']:>7.2f} ms ({row['decode_ratio']:.3f}x) | "
            f"accuracy level {row['accuracy_level'] or '-'}"
            + (f" | PPL {row['torch_perplexity_quick']}" if "torch_perplexity_quick" in row else "")
        )
    linear = compiled.report.linear_weight_bytes
    summary = {
        "runs": args.runs,
        "threads": args.threads,
        "models": results,
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
