"""What translating the compiled program directly saves over ``torch.onnx.export``'s decomposition.

:func:`fptq_compile.exporters.onnx_lowering.lower` translates a program whose ops all have
ONNX translations without ``torch.onnx.export``'s ``run_decompositions`` (a re-trace of
the whole graph). This loads one saved compiled model (an output folder of ``fptq compile``,
e.g. SmolLM2's), captures its program once, and lowers it both ways (``--repeats`` times
each, alternating, in one process, no optimizer: what the ``ort`` export does before its
fusions). It checks that both give the same ONNX ops, inputs and outputs once onnxscript's
optimizer has run on them (untimed; unoptimized, the decomposed graph holds an ``Identity``
per cache layer that the direct one does not, and one ``Cast`` fewer), and prints each
run's seconds and the medians; writes JSON (default benchmarks/results/onnx_lowering.json).

    python benchmarks/onnx_lowering.py FOLDER [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

ROUTES = ("decomposed", "direct")


def lower_once(program: Any, compiled: Any, route: str) -> tuple[float, Any]:
    import contextlib
    from unittest import mock

    from fptq_compile.exporters import onnx_lowering
    from fptq_compile.exporters.onnx_qdq import OPSET, io_names

    inputs, outputs = io_names(compiled.kv_layout)
    forced = mock.patch.object(onnx_lowering, "untranslatable_op", lambda graph, registry: "forced by the benchmark")
    start = time.perf_counter()
    with forced if route == "decomposed" else contextlib.nullcontext():
        lowered = onnx_lowering.lower(
            program,
            opset=OPSET,
            dynamic_shapes=compiled.example_signature().dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            optimize=False,
        )
    seconds = time.perf_counter() - start
    if lowered.route.value != route:
        raise SystemExit(f"asked for the {route} route, got {lowered.route.value}: {lowered.reason}")
    return seconds, lowered.model


def signature(model: Any) -> dict[str, Any]:
    import onnxscript

    unoptimized = collections.Counter(node.op_type for node in model.graph)
    onnxscript.optimizer.optimize(model)
    return {
        "unoptimized_ops": dict(unoptimized),
        "ops": dict(collections.Counter(node.op_type for node in model.graph)),
        "inputs": [str(value.name) for value in model.graph.inputs],
        "outputs": [str(value.name) for value in model.graph.outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an output folder of fptq compile (a saved compiled model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "onnx_lowering.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from fptq_compile.saving import load_compiled

    compiled = load_compiled(args.folder)
    program = compiled.exported_program()
    nodes = len(program.graph.nodes)
    runs: dict[str, list[float]] = {route: [] for route in ROUTES}
    graphs: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for route in ROUTES:
            seconds, model = lower_once(program, compiled, route)
            runs[route].append(round(seconds, 2))
            graphs[route] = signature(model)
            print(f"{route}, run {repeat + 1}: {seconds:.2f} s", flush=True)
    optimized = [{key: value for key, value in graphs[route].items() if key != "unoptimized_ops"} for route in ROUTES]
    if optimized[0] != optimized[1]:
        raise SystemExit("the two routes gave different graphs")
    medians = {route: statistics.median(seconds) for route, seconds in runs.items()}
    result = {
        "folder": str(args.folder),
        "program_nodes": nodes,
        "onnx_nodes_optimized": sum(graphs["direct"]["ops"].values()),
        "unoptimized_ops": {route: graphs[route]["unoptimized_ops"] for route in ROUTES},
        "same_graph_optimized": True,
        "seconds": runs,
        "median_seconds": medians,
        "ratio_direct_to_decomposed": round(medians["direct"] / medians["decomposed"], 3),
    }
    print(json.dumps({key: result[key] for key in ("program_nodes", "onnx_nodes_optimized", "median_seconds")}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
