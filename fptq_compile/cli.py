"""The ``fptq`` command line.

``fptq compile [MODEL]`` compiles a model (the built-in SmolLM2-135M when MODEL is
omitted) to W4A8 with FPTQ, writes ``plan.json``, ``report.json`` and ``config.json`` to
``--out``, and with ``--prompt`` generates text with the compiled model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fptq_compile.calibration import RandomTokens, TextFile
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig, WeightConfig
from fptq_compile.errors import FptqError
from fptq_compile.io import atomic_directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fptq", description="W4A8 FPTQ quantization compiler for LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    compile_ = commands.add_parser("compile", help="quantize a causal LM to W4A8 and write its plan and report")
    compile_.add_argument("model", nargs="?", help="HF model id, model folder or .gguf file (default: SmolLM2-135M)")
    compile_.add_argument("--calib", default="random", help="calibration text file, or 'random' (data-free, default)")
    compile_.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    compile_.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    compile_.add_argument("--group-size", type=int, default=128, help="int4 weight group size (default 128)")
    compile_.add_argument("--asymmetric", action="store_true", help="asymmetric int4 weight groups")
    compile_.add_argument(
        "--policy",
        choices=[p.value for p in ActivationPolicy],
        default=ActivationPolicy.FPTQ.value,
        help="activation policy (default fptq)",
    )
    compile_.add_argument("--thresholds", type=float, nargs=2, metavar=("V0", "V1"), default=(15.0, 150.0))
    compile_.add_argument("--ignore", nargs="*", default=[], metavar="PATTERN", help="module paths kept float")
    compile_.add_argument("--out", type=Path, help="folder for plan.json, report.json and config.json")
    compile_.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    compile_.add_argument("--prompt", help="generate a continuation of this prompt with the compiled model")
    compile_.add_argument("--max-new-tokens", type=int, default=24)
    compile_.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _compile(args: argparse.Namespace) -> int:
    import fptq_compile as fptq

    config = CompileConfig(
        weights=WeightConfig(group_size=args.group_size, symmetric=not args.asymmetric),
        activations=ActivationConfig(
            policy=ActivationPolicy(args.policy),
            static_threshold=args.thresholds[0],
            dynamic_threshold=args.thresholds[1],
        ),
        ignore=tuple(args.ignore),
    )
    calibration = RandomTokens() if args.calib == "random" else TextFile(Path(args.calib))
    loaded = fptq.load_model(args.model)
    compiled = fptq.compile(
        loaded, calibration, config, num_samples=args.samples, seq_len=args.seq_len, progress=not args.quiet
    )
    summary = compiled.plan.summary()
    print(f"compiled {loaded.source}: {json.dumps(summary['linears_per_activation_class'])}", file=sys.stderr)
    if args.out is not None:
        with atomic_directory(args.out, overwrite=args.overwrite) as staging:
            (staging / "plan.json").write_text(compiled.plan.to_json(), encoding="utf-8")
            (staging / "report.json").write_text(json.dumps(compiled.report.to_dict(), indent=1), encoding="utf-8")
            resolved = dataclasses.asdict(config)
            resolved["activations"]["policy"] = config.activations.policy.value
            (staging / "config.json").write_text(json.dumps(resolved, indent=1), encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.prompt:
        text = fptq.generate_greedy(compiled, loaded.tokenizer, args.prompt, args.max_new_tokens)
        print(args.prompt + text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _compile(args)
    except FptqError as error:
        if args.debug:
            raise
        print(f"fptq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
