"""The SmolLM2 pipeline's time (issue 5: load, compile, export ≤ 60 s), and where it goes.

Runs the README's main command without ``--prompt`` (``fptq compile --out DIR --overwrite
--quiet --json``: load the built-in SmolLM2-135M, compile it on random tokens, export the
``ort`` folder) ``--repeats`` times, each in a fresh process, and prints the medians of
its wall time (process start included) and of the parts ``--json`` reports: load,
compile and export, each compile step, each export step.

``--baseline PATH`` also runs another checkout of fptq_compile (a ``git worktree`` of an
earlier commit), alternating with this one in the same session, so the two are compared
on the same (shared, noisy) machine. Parts that the baseline's ``--json`` does not report
are left out of its row. ``--variant NAME="OPTIONS"`` adds a row of this checkout run with
more ``fptq compile`` options (e.g. ``bf16="--calib-dtype bfloat16"``), in the same
rotation. Before each run the host's float32 matmul throughput is measured
(``matmul_gflops``: SmolLM2's up projection on a calibration batch, 2048 x 576 x 1536),
so that runs on a busy shared host show as such. With a baseline, each repeat's wall
time difference (this - baseline) is reported too, and its median: the pair ran minutes
apart on the same host. ``--export-only FOLDER`` times the export alone instead: ``fptq
export FOLDER --format ort`` (FOLDER an output folder of ``fptq compile``: its saved
compiled model is read back and exported; wall time only). Writes JSON (default
benchmarks/results/pipeline_time.json).

    python benchmarks/pipeline_time.py [--repeats 3] [--baseline PATH] [--variant NAME=OPTIONS ...]
                                       [--export-only FOLDER] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parents[1]


def from_checkout(source: Path) -> dict[str, Any]:
    """``subprocess.run`` arguments that import fptq_compile from ``source``: on PYTHONPATH,
    and the working directory, which ``python -m`` puts first on sys.path."""
    return {"cwd": source, "env": {**os.environ, "PYTHONPATH": str(source)}}


def matmul_gflops(repeats: int = 5, products: int = 20) -> float:
    """This process's float32 matmul throughput now (median of ``repeats`` timings of
    ``products`` 2048 x 576 by 576 x 1536 products): calibration is such products."""
    import torch

    left, right = torch.randn(2048, 576), torch.randn(576, 1536)
    left @ right  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(products):
            left @ right
        seconds.append(time.perf_counter() - start)
    return round(2 * 2048 * 576 * 1536 * products / statistics.median(seconds) / 1e9, 1)


def run_once(source: Path, out: Path, options: list[str], export_only: Path | None = None) -> dict[str, Any]:
    """One ``fptq compile`` of the default model (or ``fptq export`` of ``export_only``) with
    the package imported from ``source``."""
    command = [sys.executable, "-m", "fptq_compile.cli", "compile", "--out", str(out), "--overwrite", "--quiet"]
    if export_only is not None:
        command[3:4] = ["export", str(export_only.resolve()), "--format", "ort"]
    command += options
    start = time.perf_counter()
    finished = subprocess.run(
        [*command, "--json"], **from_checkout(source), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        raise SystemExit(f"fptq {command[3]} from {source} failed ({finished.returncode}):\n{finished.stderr[-2000:]}")
    result = json.loads(finished.stdout)
    parts = {"wall": round(wall, 2), **result.get("seconds", {})}
    parts.update({f"compile.{step}": value for step, value in result.get("seconds_per_step", {}).items()})
    parts.update({f"export.{step}": value for step, value in result.get("export_seconds_per_step", {}).items()})
    return parts


def check_imports_from(source: Path) -> None:
    """Refuse a checkout whose runs would import fptq_compile from elsewhere (an installed copy)."""
    probe = [sys.executable, "-c", "import fptq_compile; print(fptq_compile.__file__)"]
    found = subprocess.run(probe, **from_checkout(source), capture_output=True, text=True, check=True)
    package = Path(found.stdout.strip()).resolve().parent.parent
    if package != source.resolve():
        raise SystemExit(f"a run from {source} imports fptq_compile from {package}")


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    names = [name for name in runs[0] if all(name in run for run in runs)]
    return {name: round(statistics.median(run[name] for run in runs), 2) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another fptq_compile checkout, run alternating with this one")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=OPTIONS", help="this checkout with more options"
    )
    parser.add_argument("--export-only", type=Path, metavar="FOLDER", help="time `fptq export FOLDER --format ort`")
    parser.add_argument("--json", type=Path, default=SOURCE / "benchmarks" / "results" / "pipeline_time.json")
    args = parser.parse_args()
    sources = {"this": SOURCE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    options: dict[str, list[str]] = {name: [] for name in sources}
    for variant in args.variant:
        name, _, line = variant.partition("=")
        if not name or name in sources:
            raise SystemExit(f"--variant needs a new NAME=OPTIONS, got {variant!r}")
        sources[name], options[name] = SOURCE, shlex.split(line)
    for source in set(sources.values()):
        check_imports_from(source)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    scratch = Path(tempfile.mkdtemp(prefix="pipeline_time."))
    try:
        for repeat in range(args.repeats):
            for name, source in sources.items():
                gflops = matmul_gflops()
                parts = run_once(source, scratch / name, options[name], args.export_only)
                runs[name].append({"matmul_gflops": gflops, **parts})
                print(f"{name} run {repeat + 1}: {json.dumps(runs[name][-1])}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        name: {"source": str(sources[name]), "options": options[name], "medians": medians(rows), "runs": rows}
        for name, rows in runs.items()
    }
    for name, row in summary.items():
        print(f"{name} ({row['source']}), medians of {args.repeats}: {json.dumps(row['medians'])}")
    if "baseline" in runs:
        pairs = [round(a["wall"] - b["wall"], 2) for a, b in zip(runs["this"], runs["baseline"], strict=True)]
        summary["paired_wall_difference"] = {"this_minus_baseline": pairs, "median": statistics.median(pairs)}
        print(f"wall time, this - baseline, per repeat: {pairs}; median {statistics.median(pairs)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
