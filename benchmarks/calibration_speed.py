"""Calibration time against a plain float forward over the same tokens, in one process.

Issue 5's bar: calibration ≤ 1.3 × a float forward. SmolLM2-135M; calibration 32 windows
of 512 tokens of the WikiText-2 validation text, in batches of 4 (the compile defaults).
Each repeat times, one after the other:

- ``float_forward``: the Hugging Face model over those token batches (logits, no cache);
- ``float_decoder``: the same without the ``lm_head`` matmul (``model.model``);
- ``observers``: the calibration step of ``fptq.compile`` with round-to-nearest weights
  (per-channel ``max|x|`` observers only);
- ``observers_hessians``: the same step with GPTQ weights (observers and ``XᵀX`` of the
  inputs rounded to bfloat16, the default ``weights.gptq.hessian_dtype``);
- ``observers_hessians_float32``: the same with ``hessian_dtype`` float32.

Calibration runs the captured graph cut down to its observers: the logits are not
computed, which is why ``float_decoder`` is printed too. Prints the medians and the
ratios to ``float_forward`` and ``float_decoder``; writes JSON (default
benchmarks/results/calibration_speed.json).

    python benchmarks/calibration_speed.py [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from protocol import calibration_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "calibration_speed.json")
    args = parser.parse_args()

    import torch

    import fptq_compile as fptq
    from fptq_compile.calibration import calibration_token_ids

    loaded = fptq.load_model()
    calibration = calibration_text()
    config = fptq.CompileConfig()
    batches = calibration_token_ids(calibration, loaded.tokenizer, 32, 512, loaded.model.config.vocab_size).split(
        config.calibration_batch_size
    )

    def forward(module: torch.nn.Module) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                module(input_ids=batch, use_cache=False)
        return time.perf_counter() - start

    def calibration_step(
        rounding: fptq.WeightRounding, hessian_dtype: fptq.CalibrationDtype = fptq.CalibrationDtype.BFLOAT16
    ) -> float:
        weights = fptq.WeightConfig(rounding=rounding, gptq=fptq.GPTQConfig(hessian_dtype=hessian_dtype))
        compiled = fptq.compile(loaded, calibration, fptq.CompileConfig(weights=weights), progress=False)
        return compiled.report.seconds_per_step["calibration"]

    runs: dict[str, list[float]] = {
        "float_forward": [],
        "float_decoder": [],
        "observers": [],
        "observers_hessians": [],
        "observers_hessians_float32": [],
    }
    for repeat in range(args.repeats):
        runs["float_forward"].append(forward(loaded.model))
        runs["float_decoder"].append(forward(loaded.model.model))
        runs["observers"].append(calibration_step(fptq.WeightRounding.NEAREST))
        runs["observers_hessians"].append(calibration_step(fptq.WeightRounding.GPTQ))
        runs["observers_hessians_float32"].append(
            calibration_step(fptq.WeightRounding.GPTQ, fptq.CalibrationDtype.FLOAT32)
        )
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{name} {times[-1]:.1f} s" for name, times in runs.items()),
            flush=True,
        )
    medians = {name: round(statistics.median(times), 2) for name, times in runs.items()}
    ratios = {
        f"{name}_vs_{reference}": round(medians[name] / medians[reference], 3)
        for name in ("observers", "observers_hessians", "observers_hessians_float32")
        for reference in ("float_forward", "float_decoder")
    }
    for name, seconds in medians.items():
        print(f"{name:20s} median {seconds:6.2f} s")
    for name, ratio in ratios.items():
        print(f"{name:40s} {ratio:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "tokens": int(sum(batch.numel() for batch in batches)),
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
    }
    args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
