"""GPTQ's Hessians from float32 inputs against bfloat16-rounded ones (``weights.gptq.hessian_dtype``).

SmolLM2-135M, in one process, compiled with the default config (text calibration: 32
windows of 512 tokens of the WikiText-2 validation text, GPTQ weights, DESIGN.md §6) once
per ``hessian_dtype``. Each row reports the calibration step's seconds (where the Hessians
are summed), GPTQ's seconds, the mean over the linears of GPTQ's output SQNR on the
calibration inputs and of its gain over round to nearest (``pass_reports.gptq_weights``),
whether the plan decides the same as float32's, and the perplexity over the first
``--windows`` WikiText-2 test windows of the compiled torch graph. Prints a table; writes
JSON (default benchmarks/results/hessian_dtype.json).

    python benchmarks/hessian_dtype.py [--windows 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from protocol import calibration_text, wikitext_test_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hessian_dtype.json")
    args = parser.parse_args()

    import fptq_compile as fptq
    from fptq_compile.evaluate import perplexity

    loaded = fptq.load_model()
    eval_ids = wikitext_test_ids(loaded.tokenizer)
    calibration = calibration_text()
    rows, plans = [], {}
    for dtype in fptq.CalibrationDtype:
        weights = fptq.WeightConfig(gptq=fptq.GPTQConfig(hessian_dtype=dtype))
        compiled = fptq.compile(loaded, calibration, fptq.CompileConfig(weights=weights), progress=False)
        steps = compiled.report.seconds_per_step
        gptq = compiled.report.pass_reports["gptq_weights"]
        output, rtn = gptq["output_sqnr_db"], gptq["rtn_output_sqnr_db"]
        plans[dtype] = compiled.plan.groups
        result = perplexity(compiled, eval_ids, max_windows=args.windows, progress=False)
        row = {
            "hessian_dtype": dtype.value,
            "calibration_seconds": steps["calibration"],
            "gptq_seconds": steps["gptq_weights"],
            "mean_output_sqnr_db": round(statistics.fmean(output.values()), 3),
            "mean_gain_over_nearest_db": round(statistics.fmean(output[n] - rtn[n] for n in output), 3),
            "same_plan_as_float32": plans[dtype] == plans[fptq.CalibrationDtype.FLOAT32],
            "perplexity": round(result.perplexity, 4),
            "windows": result.windows,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del compiled
    print(f"{'hessian':<9} {'calib s':>8} {'gptq s':>7} {'out SQNR dB':>11} {'gain dB':>8} {'same plan':>9} {'PPL':>8}")
    for row in rows:
        print(
            f"{row['hessian_dtype']:<9} {row['calibration_seconds']:8.2f} {row['gptq_seconds']:7.2f} "
            f"{row['mean_output_sqnr_db']:11.3f} {row['mean_gain_over_nearest_db']:8.3f} "
            f"{row['same_plan_as_float32']!s:>9} {row['perplexity']:8.4f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
