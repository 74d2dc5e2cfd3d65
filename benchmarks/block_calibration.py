"""Whole-model vs block-by-block calibration of SmolLM2-135M, in one process.

Default compile config (``calibrate_by_block`` off, then on); calibration: 32 windows of
512 tokens of the tokenized WikiText-2 validation text; perplexity over the first 40
WikiText-2 test windows (DESIGN.md §6 quick mode). Prints each compile's time per step
and perplexity, whether the two plans decide the same, and the largest relative
difference of their static scales; writes JSON (default
benchmarks/results/block_calibration.json).

    python benchmarks/block_calibration.py [--windows 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from protocol import calibration_text, wikitext_test_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "block_calibration.json")
    args = parser.parse_args()

    import fptq_compile as fptq
    from fptq_compile.evaluate import perplexity

    loaded = fptq.load_model()
    calibration = calibration_text()
    eval_ids = wikitext_test_ids(loaded.tokenizer)
    config = fptq.CompileConfig()
    rows, plans = {}, {}
    for name, row_config in (("whole", config), ("by_block", dataclasses.replace(config, calibrate_by_block=True))):
        start = time.perf_counter()
        compiled = fptq.compile(loaded, calibration, row_config, progress=False)
        seconds = round(time.perf_counter() - start, 1)
        ppl = perplexity(compiled, eval_ids, max_windows=args.windows, progress=False).perplexity
        plans[name] = compiled.plan
        rows[name] = {
            "compile_seconds": seconds,
            "compile_steps": compiled.report.seconds_per_step,
            "perplexity": round(ppl, 4),
            "linears_per_class": compiled.plan.activation_class_counts(),
        }
        print(f"{name:9s} compile {seconds:6.1f} s  PPL {ppl:.4f}  {rows[name]['compile_steps']}", flush=True)
        del compiled
    whole, by_block = plans["whole"].groups, plans["by_block"].groups
    same = [(g.input_node, g.linears, g.activation.kind, g.fold) for g in whole] == [
        (g.input_node, g.linears, g.activation.kind, g.fold) for g in by_block
    ]
    scale_difference = max(
        abs(a.activation.scale - b.activation.scale) / abs(a.activation.scale)
        for a, b in zip(whole, by_block, strict=True)
        if a.activation.scale is not None and b.activation.scale is not None
    )
    ppl_difference = rows["by_block"]["perplexity"] - rows["whole"]["perplexity"]
    summary = {
        "rows": rows,
        "same_decisions": same,
        "max_relative_static_scale_difference": scale_difference,
        "perplexity_difference": round(ppl_difference, 4),
    }
    print(
        f"same decisions: {same}; static scales differ by at most {scale_difference:.3g} (relative); "
        f"PPL difference {ppl_difference:+.4f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
