"""The ``fptq`` command line: compile, inspect, eval, generate, export.

``fptq compile [MODEL]`` quantizes a model (the built-in SmolLM2-135M when MODEL is
omitted, with data-free calibration: works offline) and writes one output folder: the
W4A8 ONNX decoder, the saved compiled model, the tokenizer, the plan, the resolved
config and the report. Every command takes ``--quiet`` (no progress bars), ``--json``
(one JSON object on stdout) and ``--debug`` (tracebacks). Errors print one line on
stderr and exit with 2 (bad input) or 1 (a failure while running).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fptq_compile.collector import fewer_collections
from fptq_compile.config import ActivationPolicy, CalibrationDtype, WeightRounding
from fptq_compile.errors import ConfigError, FptqError
from fptq_compile.exporters.onnx_qdq import OnnxLayout
from fptq_compile.progress import StepProgress

EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.debug:
        # torch.onnx's notes on optional packages and deprecations are not the user's concern.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        with fewer_collections():  # and for what runs between the library's calls
            result: dict[str, Any] = args.run(args)
    except (Exception, KeyboardInterrupt) as error:
        if args.debug:
            raise
        code, message = _describe_failure(error)
        print(message, file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(result))
    return 0


def _describe_failure(error: BaseException) -> tuple[int, str]:
    """The exit code and the one line shown for ``error`` (outputs are never half-written)."""
    if isinstance(error, FptqError):
        return EXIT_BAD_INPUT, "fptq: error: " + " ".join(str(error).split())
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "fptq: interrupted"
    message = " ".join(str(error).split())
    if isinstance(error, OSError):  # disk full, permissions
        return EXIT_FAILURE, f"fptq: error: {message}"
    return (
        EXIT_FAILURE,
        f"fptq: internal error: {type(error).__name__}: {message} (rerun with --debug for the traceback)",
    )


# --- the parser ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from fptq_compile import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    common.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser = argparse.ArgumentParser(
        prog="fptq",
        description="W4A8 (int4 weights, int8 activations) FPTQ quantization compiler for LLMs.",
        epilog="Run `fptq COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"fptq_compile {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], dict[str, Any]], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    compile_ = command("compile", _compile, "quantize a causal LM to W4A8 and write an output folder (ONNX + report)")
    _add_compile_options(compile_)
    compile_.add_argument(
        "--offload",
        action="store_true",
        help="MODEL is a checkpoint folder bigger than memory: its blocks stay on disk and are compiled one at a "
        "time (implies --by-block; the folder gets no saved compiled model)",
    )
    compile_.add_argument(
        "--max-memory",
        nargs="+",
        metavar="DEVICE=SIZE",
        help="with --offload: the memory blocks may take per device (e.g. 0=70GiB 1=70GiB cpu=64GiB); they fill "
        "the GPUs, then CPU memory, the rest stays on disk (default: every block on disk)",
    )
    compile_.add_argument("--layout", choices=[layout.value for layout in OnnxLayout], help="ONNX layout (ort)")
    compile_.add_argument(
        "--out", type=Path, default=Path("fptq-out"), metavar="DIR", help="output folder (default fptq-out)"
    )
    compile_.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    compile_.add_argument("--ppl", type=Path, metavar="TEXTFILE", help="also measure WikiText perplexity on this file")
    compile_.add_argument(
        "--windows", type=int, metavar="N", help="with --ppl: evaluate the first N 512-token windows only"
    )
    compile_.add_argument(
        "--prompt", metavar="TEXT", help="then generate a continuation of this prompt from the ONNX folder"
    )
    compile_.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="tokens to generate (default 24)")

    inspect = command("inspect", _inspect, "show activation ranges per linear and the plan FPTQ would choose")
    _add_compile_options(inspect)

    eval_ = command("eval", _eval, "perplexity of a float model, a compiled model or an exported ONNX folder")
    eval_.add_argument("target", nargs="?", help="output folder of `fptq compile`, or a model (default SmolLM2)")
    eval_.add_argument("--ppl", type=Path, required=True, metavar="TEXTFILE", help="WikiText-2 raw text file")
    eval_.add_argument(
        "--windows", type=int, metavar="N", help="evaluate the first N 512-token windows only (default all)"
    )
    eval_.add_argument(
        "--backend",
        choices=["onnx", "torch"],
        default="onnx",
        help="for an output folder: its ONNX model in ONNX Runtime (default) or the saved compiled torch model",
    )
    _add_accuracy_level(eval_)

    generate = command("generate", _generate, "generate text with an exported ONNX folder")
    generate.add_argument("folder", type=Path, help="output folder of `fptq compile`")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    _add_accuracy_level(generate)

    export = command("export", _export, "re-export a saved compiled model to ONNX in another layout")
    export.add_argument("folder", type=Path, help="output folder of `fptq compile`")
    export.add_argument("--format", required=True, choices=[layout.value for layout in OnnxLayout], help="layout")
    export.add_argument("--out", type=Path, metavar="DIR", help="new output folder (default FOLDER-FORMAT)")
    export.add_argument("--overwrite", action="store_true", help="replace the new output folder if it exists")
    return parser


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    """Options that decide the plan; unset ones come from --config, then the defaults."""
    parser.add_argument("model", nargs="?", help="HF model id, model folder or .gguf file (default: SmolLM2-135M)")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="a .toml, .yaml or .json file with any of these options"
    )
    parser.add_argument("--calib", metavar="SOURCE", help="calibration text file, or 'random' (data-free, default)")
    parser.add_argument("--samples", type=int, metavar="N", help="calibration sequences (default 32)")
    parser.add_argument("--seq-len", type=int, metavar="L", help="tokens per calibration sequence (default 512)")
    parser.add_argument(
        "--calib-dtype",
        choices=[d.value for d in CalibrationDtype],
        help="precision of the matmuls while calibrating: float32 (default) or bfloat16 (torch.autocast; "
        "faster on CPUs with bfloat16 units and on GPUs, statistics slightly different)",
    )
    parser.add_argument(
        "--group-size", type=int, metavar="G", help="int4 weight group size, a power of two (default 128)"
    )
    parser.add_argument("--symmetric", action="store_true", help="symmetric int4 weight groups (default asymmetric)")
    parser.add_argument(
        "--rounding",
        choices=[r.value for r in WeightRounding],
        help="int4 codes by GPTQ (default with text calibration; slower) or round to nearest "
        "(default with data-free calibration)",
    )
    parser.add_argument(
        "--policy", choices=[p.value for p in ActivationPolicy], help="activation policy (error_driven)"
    )
    parser.add_argument("--thresholds", type=float, nargs=2, metavar=("V0", "V1"), help="FPTQ v0 < v1 (15 150)")
    parser.add_argument("--no-lae", action="store_true", help="LAE candidates go per-token dynamic instead")
    parser.add_argument(
        "--kv-int8", action="store_true", help="keys and values enter the cache as int8 per token and head"
    )
    parser.add_argument(
        "--by-block", action="store_true", help="calibrate the decoder blocks one after another (same plan)"
    )
    parser.add_argument("--ignore", nargs="+", metavar="PATTERN", help="module-path patterns kept float")
    parser.add_argument(
        "--int8-weight-only",
        nargs="+",
        metavar="PATTERN",
        help="module-path patterns given int8 weights and float activations, e.g. lm_head (faster decoding)",
    )


def _add_accuracy_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=[1, 4],
        default=1,
        help="ONNX Runtime's int4/int8 MatMuls: 1 = float math, the torch reference's numbers (default); "
        "4 = int8 activations inside the op (ORT's default; faster, and needed for fast 8-bit layers)",
    )


def _resolve_job(args: argparse.Namespace) -> Any:
    """The job from --config with the flags given on the command line applied over it."""
    from fptq_compile.job import job_from_dict, read_config_file

    data = read_config_file(args.config) if args.config else {}

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            table = data if section is None else data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section} must be a table of keys, got {table!r}")
            table[key] = value

    put(None, "model", args.model)
    put(None, "offload", True if getattr(args, "offload", False) else None)
    put(None, "max_memory", getattr(args, "max_memory", None))
    put("calibration", "source", args.calib)
    put("calibration", "samples", args.samples)
    put("calibration", "seq_len", args.seq_len)
    put(None, "calibration_dtype", args.calib_dtype)
    put("weights", "group_size", args.group_size)
    put("weights", "symmetric", True if args.symmetric else None)
    put("weights", "rounding", args.rounding)
    put("activations", "policy", args.policy)
    if args.thresholds:
        put("activations", "static_threshold", args.thresholds[0])
        put("activations", "dynamic_threshold", args.thresholds[1])
    put("activations", "use_lae", False if args.no_lae else None)
    put(None, "kv_cache_int8", True if args.kv_int8 else None)
    put(None, "calibrate_by_block", True if args.by_block else None)
    put(None, "ignore", args.ignore)
    put(None, "int8_weight_only", args.int8_weight_only)
    put("export", "layout", getattr(args, "layout", None))
    calibration = data.get("calibration")
    data_free = not isinstance(calibration, dict) or calibration.get("source", "random") == "random"
    weights = data.get("weights")
    if data_free and not (isinstance(weights, dict) and "rounding" in weights):
        # GPTQ fits the Hessian of its calibration inputs; on random tokens it measured worse
        # than round to nearest (SmolLM2: 41.07 vs 40.68 PPL), and it costs time.
        put("weights", "rounding", "nearest")
    return job_from_dict(data)


def _status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _calibration_source(source: str) -> Any:
    """``random`` or a text file, checked (exists, UTF-8, not empty) before the model loads."""
    from fptq_compile.calibration import RandomTokens, TextFile, read_calibration_text
    from fptq_compile.errors import CalibrationError

    if source == "random":
        return RandomTokens()
    text_file = TextFile(Path(source))
    if not read_calibration_text(text_file).strip():
        raise CalibrationError(f"calibration text from {source} is empty")
    return text_file


def _load_and_run(
    args: argparse.Namespace, job: Any, step: Callable[..., Any], timer: StepProgress | None = None
) -> tuple[Any, Any]:
    """Check the calibration source, load the model, then run ``compile`` or ``analyze`` on
    them; ``timer`` (shown or not) records the wall time of each, as ``load`` and ``compile``."""
    timer = timer or StepProgress("", ("load", "compile"), enabled=False)
    calibration = _calibration_source(job.calibration.source)
    with timer.step("load"):
        loaded = _load_model(args, job.model, job.offload, job.max_memory)
    with timer.step("compile"):
        result = step(
            loaded,
            calibration,
            job.compile,
            num_samples=job.calibration.samples,
            seq_len=job.calibration.seq_len,
            progress=not args.quiet,
        )
    return loaded, result


def _load_model(
    args: argparse.Namespace, source: str | None, offload: bool = False, max_memory: Sequence[str] = ()
) -> Any:
    """``load_model`` (``load_offloaded`` with ``offload``, within ``max_memory``); with --quiet,
    without the progress bar transformers' GGUF reader always shows."""
    import fptq_compile as fptq
    from fptq_compile.job import parse_budget
    from fptq_compile.offload import load_offloaded

    budget = parse_budget(max_memory) if max_memory else None
    with contextlib.redirect_stderr(io.StringIO()) if args.quiet else contextlib.nullcontext():
        return load_offloaded(source, budget) if offload and source is not None else fptq.load_model(source)


# --- the commands ------------------------------------------------------------------


def _compile(args: argparse.Namespace) -> dict[str, Any]:
    import fptq_compile as fptq
    from fptq_compile.exporters import export_folder
    from fptq_compile.job import RESOLVED_CONFIG_FILE, job_to_dict

    job = _resolve_job(args)
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"output folder {args.out} exists; pass --overwrite to replace it")
    if args.ppl is not None and not args.ppl.is_file():
        raise ConfigError(f"perplexity text {args.ppl} does not exist")
    if args.ppl is not None and job.offload:
        raise ConfigError(
            "--ppl runs the compiled torch model, which --offload keeps on disk: measure the folder's ONNX model "
            "with `fptq eval DIR --ppl TEXTFILE` instead"
        )
    # Where the time goes, without a bar of its own (each part shows its own progress).
    timer = StepProgress("", ("load", "compile", "export"), enabled=False)
    start = time.perf_counter()
    loaded, compiled = _load_and_run(args, job, fptq.compile, timer)
    counts = compiled.plan.activation_class_counts()
    _status(args, f"compiled {loaded.source}: linears per activation class {json.dumps(counts)}")
    perplexity = None
    if args.ppl is not None:
        perplexity = _perplexity(compiled, loaded.tokenizer, args.ppl, args.windows, not args.quiet)["perplexity"]
        _status(args, f"perplexity (compiled torch model): {perplexity:.3f}")
    with timer.step("export"):
        exported = export_folder(
            compiled,
            loaded.tokenizer,
            args.out,
            job.export.layout,
            overwrite=args.overwrite,
            model_config=getattr(loaded.model, "config", None),
            report_fields={"model": loaded.source, "perplexity": perplexity},
            extra_files={RESOLVED_CONFIG_FILE: json.dumps(job_to_dict(job), indent=1)},
            progress=not args.quiet,
        )
    timer.close()
    seconds = {**timer.seconds, "total": round(time.perf_counter() - start, 3)}
    _status(args, f"wrote {args.out} ({exported.file_bytes / 1e6:.1f} MB ONNX, layout {job.export.layout.value})")
    result = {
        "out": str(args.out),
        "model": loaded.source,
        "onnx_bytes": exported.file_bytes,
        "layout": job.export.layout.value,
        "linears_per_activation_class": counts,
        "seconds_per_step": compiled.report.seconds_per_step,
        "capture_route": compiled.report.capture_route,
        "export_seconds_per_step": dict(exported.seconds_per_step),
        "seconds": seconds,
        "perplexity": perplexity,
    }
    if args.prompt:
        result["text"] = args.prompt + _generate_from_folder(args.out, args.prompt, args.max_new_tokens, 0.0)
        if not args.json:
            print(result["text"])
    return result


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    import fptq_compile as fptq

    loaded, analysis = _load_and_run(args, _resolve_job(args), fptq.analyze)
    plan = analysis.plan
    paths = {layer.node: layer.module_path for layer in plan.layers}
    rows: list[dict[str, Any]] = [
        {
            "linears": [paths[node] for node in group.linears],
            "activation_absmax": group.activation_absmax,
            "activation_class": group.activation.kind.value,
            "activation_sqnr_db": (group.candidate_sqnr_db or {}).get(group.candidate or ""),
            "reason": group.reason,
        }
        for group in plan.groups
    ]
    if not args.json:
        print(f"{'max|X|':>9}  {'class':<10}  {'SQNR dB':>7}  linears  (reason)")
        for row in rows:
            sqnr = "-" if row["activation_sqnr_db"] is None else f"{row['activation_sqnr_db']:.1f}"
            names = ", ".join(row["linears"])
            print(f"{row['activation_absmax']:9.3g}  {row['activation_class']:<10}  {sqnr:>7}  {names}")
            print(f"{'':33}({row['reason']})")
        for layer in plan.skipped:
            print(f"{'':9}  {'float':<10}  {'-':>7}  {layer.module_path}  ({layer.reason})")
        print(f"linears per activation class: {json.dumps(plan.activation_class_counts())}")
    return {"model": loaded.source, "groups": rows, "summary": plan.summary(), "plan": plan.to_dict()}


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from fptq_compile.saving import is_saved_compiled, load_compiled

    if not args.ppl.is_file():
        raise ConfigError(f"perplexity text {args.ppl} does not exist")
    target = Path(args.target) if args.target else None
    forward: Any
    tokenizer: Any
    if target is not None and target.is_dir() and (target / "model.onnx").is_file() and args.backend == "onnx":
        from fptq_compile.runtime import OrtCausalLM

        session = OrtCausalLM.load(target, exact=args.accuracy_level == 1)
        forward, tokenizer, kind = session, AutoTokenizer.from_pretrained(target), "onnx"
    elif target is not None and is_saved_compiled(target):
        forward, tokenizer, kind = load_compiled(target), AutoTokenizer.from_pretrained(target), "compiled torch"
    else:
        loaded = _load_model(args, args.target)
        model = loaded.model
        forward, tokenizer, kind = (lambda ids: model(input_ids=ids).logits), loaded.tokenizer, "float torch"
    result = {
        "target": args.target,
        "model_kind": kind,
        **_perplexity(forward, tokenizer, args.ppl, args.windows, not args.quiet),
    }
    if not args.json:
        print(f"perplexity ({kind}, {result['windows']} windows): {result['perplexity']:.3f}")
    return result


def _perplexity(forward: Any, tokenizer: Any, text_file: Path, windows: int | None, progress: bool) -> dict[str, Any]:
    from fptq_compile.evaluate import perplexity, wikitext_token_ids

    if windows is not None and windows < 1:
        raise ConfigError(f"--windows must be at least 1, got {windows}")
    measured = perplexity(forward, wikitext_token_ids(text_file, tokenizer), max_windows=windows, progress=progress)
    return {"perplexity": measured.perplexity, "windows": measured.windows, "tokens": measured.predicted_tokens}


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    text = args.prompt + _generate_from_folder(
        args.folder, args.prompt, args.max_new_tokens, args.temperature, exact=args.accuracy_level == 1
    )
    if not args.json:
        print(text)
    return {"folder": str(args.folder), "text": text}


def _generate_from_folder(
    folder: Path, prompt: str, max_new_tokens: int, temperature: float, exact: bool = True
) -> str:
    from transformers import AutoTokenizer

    from fptq_compile.generation import generate_text
    from fptq_compile.runtime import OrtCausalLM

    model = OrtCausalLM.load(folder, exact=exact)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return generate_text(model, tokenizer, prompt, max_new_tokens, temperature)


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from fptq_compile.exporters import export_folder
    from fptq_compile.job import RESOLVED_CONFIG_FILE
    from fptq_compile.report import REPORT_JSON
    from fptq_compile.saving import load_compiled

    out = args.out or args.folder.with_name(f"{args.folder.name}-{args.format}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output folder {out} exists; pass --overwrite to replace it")
    compiled = load_compiled(args.folder)
    has_tokenizer = any((args.folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.folder) if has_tokenizer else None
    model_config = AutoConfig.from_pretrained(args.folder) if (args.folder / "config.json").is_file() else None
    summary = _read_json(args.folder / REPORT_JSON).get("summary", {})
    extra_files = {}
    if (args.folder / RESOLVED_CONFIG_FILE).is_file():
        job = _read_json(args.folder / RESOLVED_CONFIG_FILE)
        job["export"] = {"layout": args.format}
        extra_files[RESOLVED_CONFIG_FILE] = json.dumps(job, indent=1)
    exported = export_folder(
        compiled,
        tokenizer,
        out,
        OnnxLayout(args.format),
        overwrite=args.overwrite,
        model_config=model_config,
        report_fields={"model": summary.get("model"), "perplexity": summary.get("perplexity")},
        extra_files=extra_files,
        progress=not args.quiet,
    )
    _status(args, f"wrote {out} ({exported.file_bytes / 1e6:.1f} MB ONNX, layout {args.format})")
    return {"out": str(out), "onnx_bytes": exported.file_bytes, "layout": args.format}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def run() -> NoReturn:
    """The ``fptq`` command: :func:`main`, then the process exits without Python's last
    garbage collection, which would walk every object left (after a SmolLM2 compile ~3 s of
    graph nodes and cached shape expressions) only for the exit to free them anyway."""
    code = main()
    gc.freeze()  # the last collection skips frozen objects; atexit handlers still run
    sys.exit(code)


if __name__ == "__main__":
    run()
