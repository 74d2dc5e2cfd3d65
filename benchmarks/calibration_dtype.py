"""Calibration in float32 against bfloat16 (``calibration_dtype``): time, plan and perplexity.

SmolLM2-135M, in one process, compiled four times: data-free calibration (random tokens,
round-to-nearest weights, the CLI's default) and text calibration (32 windows of 512 tokens
of the WikiText-2 validation text, GPTQ weights, DESIGN.md §6), each with
``calibration_dtype`` float32 and bfloat16, everything else at the defaults. Each row
reports the calibration and error-measurement steps' seconds, the linears per activation
class, how many activation groups the bfloat16 plan decides otherwise than the float32
one, and the quick-mode perplexity (the first 40 WikiText-2 test windows) of the compiled
torch graph. Prints a table; writes JSON (default benchmarks/results/calibration_dtype.json).

    python benchmarks/calibration_dtype.py [--windows 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protocol import calibration_text, wikitext_test_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "calibration_dtype.json")
    args = parser.parse_args()

    import fptq_compile as fptq
    from fptq_compile.evaluate import perplexity

    loaded = fptq.load_model()
    eval_ids = wikitext_test_ids(loaded.tokenizer)
    sources = {
        "random, nearest": (fptq.RandomTokens(), fptq.WeightRounding.NEAREST),
        "text, gptq": (calibration_text(), fptq.WeightRounding.GPTQ),
    }
    rows = []
    for source_name, (calibration, rounding) in sources.items():
        decisions = {}
        for dtype in fptq.CalibrationDtype:
            config = fptq.CompileConfig(weights=fptq.WeightConfig(rounding=rounding), calibration_dtype=dtype)
            compiled = fptq.compile(loaded, calibration, config, progress=False)
            steps = compiled.report.seconds_per_step
            decisions[dtype] = [group.activation.kind for group in compiled.plan.groups]
            result = perplexity(compiled, eval_ids, max_windows=args.windows, progress=False)
            row = {
                "calibration": source_name,
                "dtype": dtype.value,
                "calibration_seconds": steps["calibration"],
                "error_seconds": steps["measure_activation_error"],
                "linears_per_class": compiled.plan.summary()["linears_per_activation_class"],
                "groups_decided_otherwise": sum(
                    mine != theirs
                    for mine, theirs in zip(decisions[dtype], decisions[fptq.CalibrationDtype.FLOAT32], strict=True)
                ),
                "perplexity": round(result.perplexity, 4),
                "windows": result.windows,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del compiled
    print(f"{'calibration':<16} {'dtype':<9} {'calib s':>8} {'errors s':>8} {'groups changed':>14} {'PPL':>8}")
    for row in rows:
        print(
            f"{row['calibration']:<16} {row['dtype']:<9} {row['calibration_seconds']:8.2f} {row['error_seconds']:8.2f} "
            f"{row['groups_decided_otherwise']:14d} {row['perplexity']:8.4f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
