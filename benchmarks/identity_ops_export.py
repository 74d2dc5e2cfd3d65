"""What removing the identity ops saves the export: one compiled model, exported with and without them.

``capture`` removes the ops a trace records that return their input
(:mod:`fptq_compile.passes.remove_identity_ops`). To see what that saves the output folder
(re-capturing the compiled graph, ``torch.onnx.export``, the ONNX Runtime fusions, saving),
this loads a compiled model saved *before* that pass existed, whose graph still holds them
(a folder written by e8727d8 or earlier: ``git worktree add ../old e8727d8`` and
``PYTHONPATH=../old fptq compile --out FOLDER``), and exports it with
:func:`~fptq_compile.exporters.export_folder` as it is and with the pass run on it,
alternating, ``--repeats`` times each in one process. Prints the node counts, each run's
seconds by step and the medians; writes JSON (default
benchmarks/results/identity_ops_export.json).

    python benchmarks/identity_ops_export.py FOLDER [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ARMS = ("with identities", "identities removed")


def export_once(folder: Path, remove: bool, destination: Path) -> dict[str, Any]:
    from fptq_compile.exporters import export_folder
    from fptq_compile.passes.remove_identity_ops import remove_identity_ops
    from fptq_compile.saving import load_compiled

    compiled = load_compiled(folder)
    removed = remove_identity_ops(compiled.graph_module).report if remove else {}
    start = time.perf_counter()
    result = export_folder(compiled, None, destination, overwrite=True, progress=False)
    seconds = round(time.perf_counter() - start, 2)
    fused = result.fusions is not None and not result.fusions.unfused_reason
    nodes = len(compiled.graph_module.graph.nodes)
    return {"nodes": nodes, "removed": removed, "fused": fused, "seconds": seconds, **result.seconds_per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a compiled model saved by e8727d8 or earlier")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "identity_ops_export.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    scratch = Path(tempfile.mkdtemp(prefix="identity_ops_export."))
    try:
        for repeat in range(args.repeats):
            for arm in ARMS:
                runs[arm].append(export_once(args.folder, arm == ARMS[1], scratch / "out"))
                print(f"{arm}, run {repeat + 1}: {json.dumps(runs[arm][-1])}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        arm: {
            "median_seconds": statistics.median(run["seconds"] for run in rows),
            "median_onnx": statistics.median(run["onnx"] for run in rows),
            "median_compiled_model": statistics.median(run["compiled model"] for run in rows),
            "runs": rows,
        }
        for arm, rows in runs.items()
    }
    for arm, row in summary.items():
        medians = f"{row['median_seconds']} s (onnx {row['median_onnx']}, saved model {row['median_compiled_model']})"
        print(f"{arm}: median {medians}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
