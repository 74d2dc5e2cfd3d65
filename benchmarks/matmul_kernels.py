"""One SmolLM2 linear layer on ONNX Runtime CPU, kernel by kernel: where W4A8 can gain on float.

For each layer shape (``K x N``: q/k/v merged, gate/up merged, down) and row count ``M``
(1: a decode step; 512: a prefill), times in one process, round-robin:

- ``fp32``: ``MatMul`` with a float32 weight (the float model);
- ``int4_level1`` / ``int4_level4``: ``DequantizeLinear(int4, block_size=128, axis=0) ->
  MatMul``, which ORT fuses into ``MatMulNBits`` (the ``ort`` layout's linears), at accuracy
  level 1 (float math) and 4 (int8 activations inside the op);
- ``int8_per_channel``: ``com.microsoft.DynamicQuantizeMatMul`` with int8 per-output-channel
  weights: ORT's int8 GEMM (VNNI / AMX where the CPU has them). Not this project's format
  (int8, not int4 in groups of 128): the speed an int8 GEMM reaches on this CPU;
- ``int4_grouped_int8_gemm``: the W4A8 numbers exactly (per-token int8 activations, int4
  codes in groups of 128) on that int8 GEMM in standard ops: one ``MatMulInteger`` per group
  (batched), then ``Cast``, the groups' scales, ``ReduceSum`` and the token scales.

Prints the median of ``--runs`` timings per kernel and its ratio to ``fp32``, the CPU's int8
features, and writes JSON (default benchmarks/results/matmul_kernels.json).

    python benchmarks/matmul_kernels.py [--runs 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576)}
ROWS = (1, 512)
GROUP = 128
INT8_FEATURES = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


def _session(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], rows: int, features: int, level: int, threads: int
) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in weights.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    # Round-robin over several sessions: a session's idle threads must not spin on the
    # cores the next session is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _kernels(rows: int, features: int, outputs: int, threads: int) -> dict[str, ort.InferenceSession]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((features, outputs)).astype(np.float32)
    groups = -(-features // GROUP)
    padded = np.zeros((groups * GROUP, outputs), np.float32)
    padded[:features] = weight
    group_scale = np.abs(padded.reshape(groups, GROUP, outputs)).max(1) / 7.5
    codes = np.clip(np.round(padded.reshape(groups, GROUP, outputs) / group_scale[:, None]), -8, 7)
    channel_scale = np.abs(weight).max(0) / 127.5
    int4_weights = {
        "codes": codes.reshape(-1, outputs)[:features].astype(ml_dtypes.int4),
        "scale": group_scale.astype(np.float32),
    }
    int4 = [
        helper.make_node("DequantizeLinear", ["codes", "scale"], ["w"], axis=0, block_size=GROUP),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    # Per-token int8 x int4 groups, exact: the token scale times the sum over groups g of
    # scale_g * (x_g @ codes_g), each product an int8 GEMM.
    grouped = [
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("ReduceMax", ["magnitude", "last"], ["absmax"], keepdims=1),
        helper.make_node("Div", ["absmax", "int8_max"], ["token_scale"]),
        helper.make_node("Div", ["x", "token_scale"], ["scaled"]),
        helper.make_node("QuantizeLinear", ["scaled", "one", "offset"], ["x_codes"]),  # uint8 = int8 code + 128
        helper.make_node("Pad", ["x_codes", "pads", "offset"], ["x_padded"]),
        helper.make_node("Reshape", ["x_padded", "by_group"], ["x_groups"]),
        helper.make_node("Transpose", ["x_groups"], ["x_group_major"], perm=[1, 0, 2]),
        helper.make_node("MatMulInteger", ["x_group_major", "group_codes", "offset"], ["partial"]),
        helper.make_node("Cast", ["partial"], ["partial_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["partial_float", "group_scale"], ["scaled_partial"]),
        helper.make_node("ReduceSum", ["scaled_partial", "first"], ["summed"], keepdims=0),
        helper.make_node("Mul", ["summed", "token_scale"], ["y"]),
    ]
    grouped_weights = {
        "last": np.array([1], np.int64),
        "first": np.array([0], np.int64),
        "int8_max": np.float32(127.5),
        "one": np.float32(1.0),
        "offset": np.uint8(128),
        "pads": np.array([0, 0, 0, groups * GROUP - features], np.int64),
        "by_group": np.array([rows, groups, GROUP], np.int64),
        "group_codes": codes.astype(np.int8),
        "group_scale": group_scale[:, None, :].astype(np.float32),
    }
    return {
        "fp32": _session([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": weight}, rows, features, 1, threads),
        "int4_level1": _session(int4, int4_weights, rows, features, 1, threads),
        "int4_level4": _session(int4, int4_weights, rows, features, 4, threads),
        "int8_per_channel": _session(
            [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale"], ["y"], domain="com.microsoft")],
            {
                "w": np.clip(np.round(weight / channel_scale), -127, 127).astype(np.int8),
                "scale": channel_scale.astype(np.float32),
            },
            rows,
            features,
            1,
            threads,
        ),
        "int4_grouped_int8_gemm": _session(grouped, grouped_weights, rows, features, 1, threads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "matmul_kernels.json")
    args = parser.parse_args()
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    features = {feature: feature in flags for feature in INT8_FEATURES}
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, CPU int8 features: {features}")
    results: dict[str, dict[str, float]] = {}
    for shape, (inputs, outputs) in SHAPES.items():
        for rows in ROWS:
            sessions = _kernels(rows, inputs, outputs, args.threads)
            x = np.random.default_rng(1).standard_normal((rows, inputs)).astype(np.float32)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for session in sessions.values():  # warm-up
                for _ in range(3):
                    session.run(None, {"x": x})
            for _ in range(args.runs):
                for name, session in sessions.items():  # round-robin: drift hits every kernel alike
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            row = {f"{name}_ms": round(1e3 * median, 4) for name, median in medians.items()}
            row |= {f"{name}_ratio": round(median / medians["fp32"], 3) for name, median in medians.items()}
            results[f"{shape}_M{rows}"] = row
            print(
                f"{shape:<8} {inputs:>5}x{outputs:<5} M={rows:<4} "
                + " | ".join(
                    f"{name} {1e3 * median:7.3f} ms ({median / medians['fp32']:.2f}x)"
                    for name, median in medians.items()
                )
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "cpu": features,
        "layers": results,
    }
    args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
