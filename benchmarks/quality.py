"""Quality of W4A8 policies on SmolLM2-135M, in one run, at the same weight settings.

Rows: float, naive W4A8 (every activation per-tensor static), W4A8 with every activation
per-token dynamic, FPTQ W4A8 with the paper's thresholds, W4A16 (weights only) and the
error-driven W4A8 policy (the default), all with the same int4 weights: asymmetric (the
default) unless ``--symmetric``, GPTQ (the default) unless ``--rounding nearest``,
MSE-searched clipping (the default) unless ``--no-clip``; and the paper's method as
published (``w4a8_fptq_paper``: its policy, round-to-nearest unclipped weights),
whose compile time the default's is compared with.
Each row runs in its own process, so its peak RSS is its own (model loading included;
the RSS right after loading is reported beside it). The paper-method row also times a plain
float forward pass over the same calibration tokens, in the same process, so compile
time can be compared with it.

Protocol: DESIGN.md §6 (quick mode: the first 40 WikiText-2 test windows of 512 tokens;
calibration: 32 windows of 512 tokens from the tokenized WikiText-2 validation text,
seed 0). Prints a table and writes JSON (default benchmarks/results/quality.json).

    python benchmarks/quality.py [--windows 40] [--group-size 128] [--symmetric] [--no-clip]
                                 [--rounding gptq|nearest] [--kv-int8] [--random-calibration]
                                 [--tasks] [--rows ...] [--json PATH]

``--tasks`` adds LAMBADA (OpenAI, first 1000 texts, last-word greedy accuracy) and PIQA
(validation, zero-shot, per-byte log-likelihood) for every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from protocol import DATA, calibration_text, wikitext_test_ids

PAPER_ROW = "w4a8_fptq_paper"
"""The paper's method as published: its policy with round-to-nearest, unclipped weights, whatever --rounding
says."""
ROWS = {
    "float": None,
    "w4a8_all_static": "all_static",
    "w4a8_all_dynamic": "all_dynamic",
    "w4a8_fptq": "fptq",
    "w4a8_fptq_paper": "fptq",
    "w4a16": "weight_only",
    "w4a8_error_driven": "error_driven",
}


def run_row(
    name: str,
    windows: int,
    group_size: int,
    symmetric: bool,
    clip: bool,
    rounding: str,
    kv_int8: bool,
    random_calibration: bool,
    tasks: bool,
    lambada_limit: int,
) -> dict:
    import torch

    import fptq_compile as fptq
    from fptq_compile.calibration import calibration_token_ids
    from fptq_compile.evaluate import perplexity
    from fptq_compile.pipeline import peak_rss_bytes

    start = time.perf_counter()
    loaded = fptq.load_model()
    row: dict = {"row": name, "load_seconds": round(time.perf_counter() - start, 2)}
    row["rss_after_load_gb"] = round(peak_rss_bytes() / 1e9, 3)
    eval_ids = wikitext_test_ids(loaded.tokenizer)
    calibration = fptq.RandomTokens() if random_calibration else calibration_text()
    policy = ROWS[name]
    rounding = "nearest" if name == PAPER_ROW else rounding
    if policy is None:
        forward = lambda ids: loaded.model(input_ids=ids, use_cache=False).logits  # noqa: E731
    else:
        config = fptq.CompileConfig(
            weights=fptq.WeightConfig(
                group_size=group_size,
                symmetric=symmetric,
                **({} if clip and name != PAPER_ROW else {"clip_ratios": ()}),
                rounding=fptq.WeightRounding(rounding),
            ),
            activations=fptq.ActivationConfig(policy=fptq.ActivationPolicy(policy)),
            kv_cache_int8=kv_int8,
        )
        if name == PAPER_ROW:
            # A plain float forward over the very tokens compile calibrates on, same batching.
            token_ids = calibration_token_ids(calibration, loaded.tokenizer, 32, 512, loaded.model.config.vocab_size)
            start = time.perf_counter()
            with torch.no_grad():
                for batch in token_ids.split(config.calibration_batch_size):
                    loaded.model(input_ids=batch, use_cache=False)
            row["float_forward_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        compiled = fptq.compile(loaded, calibration, config, progress=False)
        row["compile_seconds"] = round(time.perf_counter() - start, 2)
        row["compile_steps"] = compiled.report.seconds_per_step
        row["plan"] = compiled.plan.summary()["linears_per_activation_class"]
        row["groups_per_class"] = _groups_per_class(compiled.plan)
        row["linear_weight_bytes"] = compiled.report.linear_weight_bytes
        if name == PAPER_ROW:
            plan_path = Path(__file__).parent / "results" / "quality_fptq_plan.json"
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            plan_path.write_text(compiled.plan.to_json(), encoding="utf-8")
        forward = compiled
    start = time.perf_counter()
    result = perplexity(forward, eval_ids, max_windows=windows, progress=False)
    row["eval_seconds"] = round(time.perf_counter() - start, 2)
    row["perplexity"] = round(result.perplexity, 3)
    row["windows"] = result.windows
    if tasks:
        from fptq_compile.evaluate import lambada_accuracy, piqa_accuracy

        start = time.perf_counter()
        lambada = lambada_accuracy(
            forward, loaded.tokenizer, DATA / "lambada" / "lambada_test.jsonl", limit=lambada_limit, progress=False
        )
        piqa = piqa_accuracy(
            forward, loaded.tokenizer, DATA / "piqa" / "valid.jsonl", DATA / "piqa" / "valid-labels.lst", progress=False
        )
        row["tasks_seconds"] = round(time.perf_counter() - start, 2)
        row["lambada_accuracy"], row["lambada_examples"] = round(lambada.accuracy, 4), lambada.examples
        row["piqa_accuracy"], row["piqa_examples"] = round(piqa.accuracy, 4), piqa.examples
    row["peak_rss_gb"] = round(peak_rss_bytes() / 1e9, 3)
    return row


def _groups_per_class(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in plan.groups:
        counts[group.activation.kind.value] = counts.get(group.activation.kind.value, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--symmetric", action="store_true", help="symmetric int4 weight groups (default asymmetric)")
    parser.add_argument(
        "--no-clip", action="store_true", help="no MSE-searched weight clipping (the default searches clip ratios)"
    )
    parser.add_argument(
        "--rounding", choices=["gptq", "nearest"], default="gptq", help="int4 rounding of every row (default gptq)"
    )
    parser.add_argument("--kv-int8", action="store_true", help="int8 KV cache for every compiled row")
    parser.add_argument(
        "--random-calibration", action="store_true", help="data-free calibration (the CLI's default) for every row"
    )
    parser.add_argument("--tasks", action="store_true", help="also LAMBADA and PIQA accuracy (slow)")
    parser.add_argument("--lambada-limit", type=int, default=1000, help="first N LAMBADA texts (default 1000)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # one row, in this process
    args = parser.parse_args()
    if args.row:
        settings = (
            args.symmetric,
            not args.no_clip,
            args.rounding,
            args.kv_int8,
            args.random_calibration,
            args.tasks,
            args.lambada_limit,
        )
        row = run_row(args.row, args.windows, args.group_size, *settings)
        print(json.dumps(row))
        return
    rows = []
    for name in args.rows:
        command = [sys.executable, __file__, "--row", name, "--windows", str(args.windows)]
        command += ["--group-size", str(args.group_size), "--lambada-limit", str(args.lambada_limit)]
        command += (
            ["--symmetric"] * args.symmetric
            + ["--no-clip"] * args.no_clip
            + ["--rounding", args.rounding]
            + ["--kv-int8"] * args.kv_int8
            + ["--random-calibration"] * args.random_calibration
            + ["--tasks"] * args.tasks
        )
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
        print(_line(row), flush=True)
    summary: dict = {"group_size": args.group_size, "symmetric": args.symmetric, "clip": not args.no_clip}
    summary["rounding"], summary["kv_int8"] = args.rounding, args.kv_int8
    summary["random_calibration"] = args.random_calibration
    summary["windows"] = args.windows
    summary["rows"] = rows
    fptq_row = next((r for r in rows if r["row"] == PAPER_ROW), None)
    default_row = next((r for r in rows if r["row"] == "w4a8_error_driven"), None)
    if fptq_row is not None and default_row is not None:
        ratio = default_row["compile_seconds"] / fptq_row["compile_seconds"]
        summary["default_over_paper_compile"] = round(ratio, 3)
        print(f"default compile {default_row['compile_seconds']} s = {ratio:.2f} x the paper method's (RTN)")
    if fptq_row is not None:
        budget = 1.5 * fptq_row["float_forward_seconds"] + 20
        summary["fptq_compile_seconds"] = fptq_row["compile_seconds"]
        summary["float_forward_seconds_same_tokens"] = fptq_row["float_forward_seconds"]
        summary["compile_budget_seconds"] = round(budget, 2)
        summary["compile_within_budget"] = fptq_row["compile_seconds"] <= budget
        print(
            f"FPTQ compile {fptq_row['compile_seconds']} s vs float forward {fptq_row['float_forward_seconds']} s "
            f"over the same tokens: budget 1.5 x forward + 20 s = {budget:.1f} s"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")


def _line(row: dict) -> str:
    parts = [f"{row['row']:<18} PPL {row['perplexity']:>8.3f}"]
    if "lambada_accuracy" in row:
        parts.append(f"LAMBADA {100 * row['lambada_accuracy']:.1f}% PIQA {100 * row['piqa_accuracy']:.1f}%")
    if "plan" in row:
        parts.append(f"linears {row['plan']}")
        parts.append(f"compile {row['compile_seconds']:>6.1f} s")
    parts.append(f"peak RSS {row['peak_rss_gb']:.2f} GB (after load {row['rss_after_load_gb']:.2f})")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
