"""The ``fptq`` command line.

``fptq compile [MODEL]`` compiles a model (the built-in SmolLM2-135M when MODEL is
omitted) to W4A8 with FPTQ and exports a self-contained ONNX folder (``model.onnx``,
tokenizer, ``plan.json``, ``config.json``, ``report.json``); with ``--prompt`` it then
generates text from that folder with ONNX Runtime. ``fptq generate DIR PROMPT`` generates
from an exported folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fptq_compile.calibration import RandomTokens, TextFile
from fptq_compile.config import ActivationConfig, ActivationPolicy, CompileConfig, WeightConfig
from fptq_compile.errors import FptqError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fptq", description="W4A8 FPTQ quantization compiler for LLMs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_ = commands.add_parser("compile", help="quantize a causal LM to W4A8 and export an ONNX folder")
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
    compile_.add_argument("--out", type=Path, default=Path("fptq-out"), help="output folder (default fptq-out)")
    compile_.add_argument("--layout", choices=["ort", "qdq"], default="ort", help="ONNX layout (default ort)")
    compile_.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    compile_.add_argument("--prompt", help="then generate a continuation of this prompt with ONNX Runtime")
    compile_.add_argument("--max-new-tokens", type=int, default=24)
    compile_.add_argument("--quiet", action="store_true", help="no progress bars")

    generate = commands.add_parser("generate", help="generate text with an exported ONNX folder")
    generate.add_argument("folder", type=Path, help="folder written by `fptq compile`")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    return parser


def _compile(args: argparse.Namespace) -> int:
    import fptq_compile as fptq
    from fptq_compile.exporters import OnnxLayout, export_folder

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    config = CompileConfig(
        weights=WeightConfig(group_size=args.group_size, symmetric=not args.asymmetric),
        activations=ActivationConfig(
            policy=ActivationPolicy(args.policy),
            static_threshold=args.thresholds[0],
            dynamic_threshold=args.thresholds[1],
        ),
        ignore=tuple(args.ignore),
    )
    if args.out.exists() and not args.overwrite:
        raise fptq.ConfigError(f"output folder {args.out} exists; pass --overwrite to replace it")
    calibration = RandomTokens() if args.calib == "random" else TextFile(Path(args.calib))
    loaded = fptq.load_model(args.model)
    compiled = fptq.compile(
        loaded, calibration, config, num_samples=args.samples, seq_len=args.seq_len, progress=not args.quiet
    )
    summary = compiled.plan.summary()["linears_per_activation_class"]
    print(f"compiled {loaded.source}: linears per activation class {json.dumps(summary)}", file=sys.stderr)
    exported = export_folder(
        compiled,
        loaded.tokenizer,
        args.out,
        OnnxLayout(args.layout),
        overwrite=args.overwrite,
        model_config=getattr(loaded.model, "config", None),
    )
    print(f"wrote {args.out} ({exported.file_bytes / 1e6:.1f} MB ONNX, layout {args.layout})", file=sys.stderr)
    if args.prompt:
        print(args.prompt + _generate_from_folder(args.out, args.prompt, args.max_new_tokens, 0.0))
    return 0


def _generate_from_folder(folder: Path, prompt: str, max_new_tokens: int, temperature: float) -> str:
    from transformers import AutoTokenizer

    from fptq_compile.generation import generate_text
    from fptq_compile.runtime import OrtCausalLM

    model = OrtCausalLM.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return generate_text(model, tokenizer, prompt, max_new_tokens, temperature)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            print(args.prompt + _generate_from_folder(args.folder, args.prompt, args.max_new_tokens, args.temperature))
            return 0
        return _compile(args)
    except FptqError as error:
        if args.debug:
            raise
        print(f"fptq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
