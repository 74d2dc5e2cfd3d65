from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_DECODER, op_counts, optimized_by_ort, tiny_llama

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_folder, export_onnx
from fptq_compile.exporters.onnx_ort_fusions import OrtFusions
from fptq_compile.runtime import OrtCausalLM

POLICIES = {
    "fptq": fptq.ActivationConfig(
        policy=fptq.ActivationPolicy.FPTQ, static_threshold=1.0, dynamic_threshold=10.0
    ),  # static, LAE and dynamic groups
    "all_static": fptq.ActivationConfig(policy=fptq.ActivationPolicy.ALL_STATIC),
    "all_dynamic": fptq.ActivationConfig(policy=fptq.ActivationPolicy.ALL_DYNAMIC),
    "weight_only": fptq.ActivationConfig(policy=fptq.ActivationPolicy.WEIGHT_ONLY),
}


def _compile(policy: str = "fptq", intermediate: int = 96, group_size: int = 32, symmetric: bool = True):
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=group_size, symmetric=symmetric), activations=POLICIES[policy]
    )
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return fptq.compile(tiny_llama(intermediate=intermediate), ids, config, progress=False)


@pytest.fixture(scope="module")
def fptq_model():
    return _compile("fptq")


@pytest.mark.parametrize("layout", list(OnnxLayout))
def test_structure_int4_weights_and_activation_qdq(fptq_model, tmp_path, layout):
    result = export_onnx(fptq_model, tmp_path / "model.onnx", layout)
    model = onnx.load(result.path)
    assert result.int4_initializers == 14
    # The ORT layout merges q/k/v and gate/up: 4 int4 weights per layer instead of 7.
    weights = 14 if layout is OnnxLayout.QDQ else 8
    assert result.merged_matmuls == (0 if layout is OnnxLayout.QDQ else 4)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == weights
    blocked = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i == 32 for a in n.attribute)
    ]
    assert len(blocked) == weights
    axes = {next(a.i for a in n.attribute if a.name == "axis") for n in blocked}
    assert axes == ({0} if layout is OnnxLayout.ORT else {1})
    groups = fptq_model.plan.groups
    counts = op_counts(model)
    # One activation Q/DQ chain per group (q/k/v and gate/up share theirs); the ORT layout folds a
    # static one's scale into its neighbours and dequantizes it with a Cast (fold_static_scales).
    dynamic = sum(g.activation.kind is fptq.ActivationClass.DYNAMIC for g in groups)
    assert len(groups) == 8 and dynamic == 2
    assert counts["QuantizeLinear"] == len(groups)
    assert counts["DequantizeLinear"] - weights == (len(groups) if layout is OnnxLayout.QDQ else dynamic)
    # Per-token chains start with Abs (GroupQueryAttention's sequence lengths use ReduceMax too).
    assert counts["Abs"] == dynamic
    # The ORT layout adds an attention mask: GroupQueryAttention reads the sequence lengths from it.
    leading = ["input_ids", "past_key_values.0.key"] if layout is OnnxLayout.QDQ else ["input_ids", "attention_mask"]
    assert [i.name for i in model.graph.input][:2] == leading
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    onnx.checker.check_model(model, full_check=True)


def test_int4_codes_and_scales_round_trip(fptq_model, tmp_path):
    export_onnx(fptq_model, tmp_path / "model.onnx", OnnxLayout.QDQ)
    model = onnx.load(tmp_path / "model.onnx")
    tensors = {t.name: t for t in model.graph.initializer}
    layer = fptq_model.plan.layers[0]
    codes = onnx.numpy_helper.to_array(tensors[f"fptq_{layer.node}_weight_int4"])
    assert codes.dtype == ml_dtypes.int4
    expected = getattr(fptq_model.graph_module, f"fptq_{layer.node}_weight_int4").numpy()
    np.testing.assert_array_equal(codes.astype(np.int8), expected)
    # Two codes per byte on disk.
    assert len(tensors[f"fptq_{layer.node}_weight_int4"].raw_data) == expected.size // 2


@pytest.mark.parametrize("layout", list(OnnxLayout))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_ort_matches_the_torch_reference(tmp_path, policy, layout):
    compiled = _compile(policy)
    export_onnx(compiled, tmp_path / "model.onnx", layout)
    session = OrtCausalLM.load(tmp_path / "model.onnx", exact=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    reference = compiled(ids)
    relative = float((session(ids) - reference).abs().max() / reference.abs().max())
    # Measured ~1e-6; an int8 rounding flip on a random model can move a logit by ~1e-3.
    assert relative < 1e-3


def test_layouts_ops_domains_and_fusions(fptq_model, tmp_path):
    ort_export = export_onnx(fptq_model, tmp_path / "ort.onnx", OnnxLayout.ORT)
    # 6 static groups: each one's Mul into the weight scales, the 2 after a norm also their Div into its weight.
    assert ort_export.fusions == OrtFusions(
        attention=2, skip_rms_norm=4, rms_norm_restored=1, attention_mask=True, folded_static_scales=8
    )
    fused = onnx.load(ort_export.path)
    static = [g for g in fptq_model.plan.groups if g.activation.kind is not fptq.ActivationClass.DYNAMIC]
    assert len(static) == 6
    # Static activations reach their MatMul from a Cast of their int8 codes, with no Mul by their scale.
    producers = {output: node for node in fused.graph.node for output in node.output}
    casts = [producers[node.input[0]] for node in fused.graph.node if node.op_type == "MatMul"]
    codes = [producers[cast.input[0]].op_type for cast in casts if cast.op_type == "Cast"]
    assert codes.count("QuantizeLinear") == len(static)
    assert [i.name for i in fused.graph.input[:2]] == ["input_ids", "attention_mask"]
    # Only the attention reads the cache, so a runtime may pass a longer buffer as the cache.
    cache_readers = {node.op_type for node in fused.graph.node for name in node.input if name.startswith("past_")}
    assert cache_readers == {"GroupQueryAttention"}
    counts = op_counts(fused)
    assert counts["GroupQueryAttention"] == 2 and counts["SkipSimplifiedLayerNormalization"] == 4
    assert counts["Slice"] == 4  # gate and up out of their merged MatMul; q/k/v go packed into the attention
    # Every merged int4 linear fuses into MatMulNBits when ORT loads the model.
    assert op_counts(optimized_by_ort(ort_export.path, tmp_path))["MatMulNBits"] == 8
    qdq_export = export_onnx(fptq_model, tmp_path / "qdq.onnx", OnnxLayout.QDQ)
    assert {node.domain for node in onnx.load(qdq_export.path).graph.node} == {""}  # portable: standard ops only


def test_a_float_model_gets_the_merged_matmuls_too(tmp_path):
    """The float baseline of the speed comparison is fused as the W4A8 model is: q/k/v and gate/up
    each one MatMul (its weights reach the merge as Transpose(initializer), not yet folded)."""
    compiled = fptq.compile(tiny_llama(), fptq.RandomTokens(), passes=(), num_samples=1, seq_len=8, progress=False)
    export = export_onnx(compiled, tmp_path / "float.onnx", OnnxLayout.ORT)
    assert export.merged_matmuls == 4 and export.fusions is not None and export.fusions.attention == 2
    model = onnx.load(export.path)
    initializers = {t.name for t in model.graph.initializer}
    merged = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].startswith("fptq_merged_")]
    assert len(merged) == 4
    # No weight is transposed at run time any more.
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    reference = compiled(ids)
    relative = float((OrtCausalLM.load(export.path)(ids) - reference).abs().max() / reference.abs().max())
    assert relative < 1e-5


def test_attention_fusion_reports_layers_it_missed(tmp_path):
    import onnx_ir as ir

    from fptq_compile.exporters.onnx_ort_fusions import fuse_for_onnx_runtime

    compiled = _compile("all_dynamic")
    export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.QDQ)
    with pytest.warns(UserWarning, match="matched 2 of 3 layers"):
        fuse_for_onnx_runtime(ir.load(tmp_path / "model.onnx"), num_layers=3)


def test_fusion_without_the_quadratic_rule_fuses_the_same_graph(fptq_model, monkeypatch):
    """The fusion skips onnxscript's slice_split_rule for speed; with the rule, the graph is the same."""
    import contextlib
    from collections import Counter

    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    from fptq_compile.exporters import onnx_ort_fusions
    from fptq_compile.exporters.onnx_qdq import _lower

    assert slice_split_rule in rewriter._DEFAULT_REWRITE_RULES  # what the fusion drops is still there
    with onnx_ort_fusions._without_quadratic_rules():
        assert slice_split_rule not in rewriter._DEFAULT_REWRITE_RULES
    assert slice_split_rule in rewriter._DEFAULT_REWRITE_RULES  # and is put back

    fast, reference = (_lower(fptq_model, OnnxLayout.ORT, optimize=False)[0] for _ in range(2))
    onnx_ort_fusions.fuse_for_onnx_runtime(fast, num_layers=2)
    monkeypatch.setattr(onnx_ort_fusions, "_without_quadratic_rules", contextlib.nullcontext)
    onnx_ort_fusions.fuse_for_onnx_runtime(reference, num_layers=2)

    def ops(model):
        return Counter((node.domain, node.op_type) for node in model.graph)

    assert ops(fast) == ops(reference)
    assert ops(fast)[("com.microsoft", "GroupQueryAttention")] == 2


@pytest.mark.parametrize("layout", list(OnnxLayout))
def test_partial_last_group_and_asymmetric_weights(tmp_path, layout):
    compiled = _compile("all_dynamic", intermediate=80, group_size=64, symmetric=False)
    export_onnx(compiled, tmp_path / "model.onnx", layout)
    model = onnx.load(tmp_path / "model.onnx")
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i > 0 for a in n.attribute)
    ]
    zero_points = [initializers[n.input[2]] for n in weights if len(n.input) > 2]
    assert len(zero_points) == (14 if layout is OnnxLayout.QDQ else 8)  # ORT: q/k/v and gate/up merged
    assert all(t.data_type == onnx.TensorProto.INT4 for t in zero_points)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    reference = compiled(ids)
    ort_logits = OrtCausalLM.load(tmp_path / "model.onnx")(ids)
    assert float((ort_logits - reference).abs().max() / reference.abs().max()) < 1e-3


def test_cached_generation_matches_torch(fptq_model, tmp_path):
    export_onnx(fptq_model, tmp_path / "model.onnx")
    session = OrtCausalLM.load(tmp_path / "model.onnx")
    assert session.kv_layout == fptq_model.kv_layout
    prompt = torch.tensor([3, 14, 15, 92])
    assert torch.equal(fptq.generate_ids(session, prompt, 8), fptq.generate_ids(fptq_model, prompt, 8))


def test_steps_on_the_shared_cache_buffer_match_fresh_caches(fptq_model, tmp_path, monkeypatch):
    """OrtCausalLM binds one growing buffer as past and present; session.run with fresh caches
    (ORT copying the past into a new present each step) gives the same logits and caches."""
    from fptq_compile import runtime

    monkeypatch.setattr(runtime, "BUFFER_MIN_LENGTH", 4)  # grows (doubles) twice over 14 positions
    export_onnx(fptq_model, tmp_path / "model.onnx")
    shared = OrtCausalLM.load(tmp_path / "model.onnx")
    assert shared.shared_buffer
    session = shared.session
    names = [i.name for i in session.get_inputs()][2:]

    def fresh_step(ids, past):
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((ids.shape[0], past[0].shape[2] + ids.shape[1]))}
        feeds["attention_mask"] = feeds["attention_mask"].astype(np.int64)
        logits, *present = session.run(None, {**feeds, **dict(zip(names, past, strict=True))})
        return torch.from_numpy(logits), present

    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(4))
    cache = fptq_model.kv_layout.empty(2)
    past = [tensor.numpy() for pair in cache for tensor in pair]
    buffers = set()
    for start, end in ((0, 4), *((i, i + 1) for i in range(4, 14))):
        logits, cache = shared.step(ids[:, start:end], cache)
        buffers.add(cache[0][0].data_ptr())
        expected, past = fresh_step(ids[:, start:end], past)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        for tensor, reference in zip((t for pair in cache for t in pair), past, strict=True):
            torch.testing.assert_close(tensor, torch.from_numpy(reference), rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape[2] == 14
    assert len(buffers) == 3  # written in place, except when the buffer grew (4 -> 8 -> 16 positions)
    # A cache that is not the buffer's (a copy) is copied in; the step is the same.
    copied = [(key.clone(), value.clone()) for key, value in cache]
    again, _ = shared.step(ids[:, -1:], copied)
    expected, _ = fresh_step(ids[:, -1:], past)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_export_folder_is_self_contained_and_atomic(fptq_model, tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}", encoding="utf-8")

    destination = tmp_path / "out"
    export_folder(fptq_model, Tokenizer(), destination, report_fields={"model": "tiny", "perplexity": 9.5})
    assert sorted(p.name for p in destination.iterdir()) == [
        "compile_config.json",
        "compile_report.json",
        "fptq_manifest.json",
        "model.onnx",
        "plan.json",
        "program.json",
        "report.html",
        "report.json",
        "report.png",
        "tokenizer.json",
        "weights.safetensors",
    ]
    assert fptq.QuantPlan.from_json((destination / "plan.json").read_text()) == fptq_model.plan
    report = json.loads((destination / "report.json").read_text())
    assert report["summary"]["model"] == "tiny" and report["summary"]["perplexity"] == 9.5
    assert report["summary"]["onnx"]["file_bytes"] == (destination / "model.onnx").stat().st_size
    assert len(report["layers"]) == len(fptq_model.plan.layers)
    assert (destination / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in (destination / "report.html").read_text()
    with pytest.raises(fptq.ConfigError, match="exists"):
        export_folder(fptq_model, Tokenizer(), destination)

    class Broken:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_folder(fptq_model, Broken(), tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_folder_loads_and_generates_in_onnxruntime_genai(fptq_model, tmp_path):
    import os

    try:
        import onnxruntime_genai as og
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("onnxruntime-genai is not installed")
    folder = tmp_path / "genai"
    export_folder(fptq_model, None, folder, model_config=tiny_llama().config)
    prompt = np.array([[5, 17, 42, 9, 77, 3]], dtype=np.int32)
    generator_params = og.GeneratorParams(og.Model(str(folder)))
    generator_params.set_search_options(max_length=prompt.shape[1] + 8, do_sample=False)
    generator = og.Generator(og.Model(str(folder)), generator_params)
    generator.append_tokens(prompt)
    genai_logits = torch.from_numpy(np.asarray(generator.get_output("logits")))
    # genai runs ORT's default accuracy level: compare with the same session settings.
    session = OrtCausalLM.load(folder, exact=False)
    reference = session(torch.from_numpy(prompt.astype(np.int64)))
    torch.testing.assert_close(
        genai_logits.reshape(reference.shape[0], -1, reference.shape[-1])[:, -1], reference[:, -1]
    )
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == fptq.generate_ids(session, torch.from_numpy(prompt[0].astype(np.int64)), 8).tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_int8_weight_only_lm_head_runs_as_8_bit_matmul(tmp_path, tied):
    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32), int8_weight_only=("lm_head",))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    compiled = fptq.compile(tiny_llama(tie=tied), ids, config, progress=False)
    result = export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.ORT)
    model = onnx.load(result.path)
    stored = [t for t in model.graph.initializer if t.name.endswith("_weight_int8")]
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    quantized = [transposed.get(n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]
    embedding = next(n.input[0] for n in model.graph.node if n.op_type == "Gather")
    assert result.fusions is not None
    if tied:  # the codes are the embedding table quantized: ORT computes them from it at load
        assert result.fusions.int8_weights_from_tables == 1 and not stored
        assert quantized.count(embedding) == 1
    else:  # an untied head's codes are stored, as int8 (never packed as int4)
        assert result.fusions.int8_weights_from_tables == 0 and embedding not in quantized
        assert [t.data_type for t in stored] == [onnx.TensorProto.INT8]
    optimized = optimized_by_ort(result.path, tmp_path)
    bits = sorted(
        a.i for n in optimized.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"
    )
    assert bits == [4] * 8 + [8]
    reference = compiled(ids)
    relative = float((OrtCausalLM.load(result.path)(ids) - reference).abs().max() / reference.abs().max())
    assert relative < 1e-4  # accuracy level 1: the codes ORT computes are the compiled graph's


def test_a_fusion_that_changes_the_logits_is_refused_and_the_unfused_graph_exported(tmp_path):
    import transformers

    # Gemma-2's attention (its own scale and logit soft-capping) does not match the pattern
    # onnxscript fuses into GroupQueryAttention: the fused graph computes other logits.
    config = transformers.Gemma2Config(
        **TINY_DECODER,
        head_dim=16,
        layer_types=["full_attention"] * 2,  # no sliding window: the check decides, not the window rule
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    weights = fptq.WeightConfig(group_size=32, rounding=fptq.WeightRounding.NEAREST)
    compiled = fptq.compile(model, torch.randint(0, 128, (2, 16)), fptq.CompileConfig(weights=weights), progress=False)
    with pytest.warns(
        UserWarning,
        match="fusions not applied: without activation quantization, the fused graph.s prefill logits differ",
    ) as warned:
        export = export_onnx(compiled, tmp_path / "model.onnx", OnnxLayout.ORT)
    assert __file__ in [w.filename for w in warned if "fusions not applied" in str(w.message)]  # the caller's line
    assert export.fusions is not None and export.fusions.attention == 0
    assert "GroupQueryAttention" not in op_counts(onnx.load(export.path))
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]  # the unfused scratch copy is gone
    session = OrtCausalLM.load(export.path, exact=True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
    reference = compiled(ids)
    assert float((session(ids) - reference).abs().max() / reference.abs().max()) < 1e-3


def test_sessions_log_no_onnx_runtime_warnings(tmp_path, capfd):
    """ORT warns once per initializer its graph optimizations leave unused (a scale its int4
    MatMul fusion absorbed: ~90 lines for SmolLM2); the project's sessions log errors only."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fptq_compile.runtime import session_options

    unused = numpy_helper.from_array(np.ones(3, np.float32), name="unused_scale")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [unused],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    capfd.readouterr()
    ort.InferenceSession(str(path), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    assert "Removing initializer 'unused_scale'" in capfd.readouterr().err  # what ORT says by default
    ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    assert "onnxruntime" not in capfd.readouterr().err
