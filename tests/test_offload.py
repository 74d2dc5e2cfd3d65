"""Offloaded loading: decoder blocks on disk, read one at a time."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import op_counts, optimized_by_ort, tiny_llama

import fptq_compile as fptq
from fptq_compile.errors import ExportError, ModelLoadError
from fptq_compile.exporters import export_folder
from fptq_compile.exporters.onnx_qdq import OnnxLayout, export_onnx
from fptq_compile.graph_utils import fetch_tensor
from fptq_compile.job import JobConfig, parse_budget
from fptq_compile.offload import (
    block_in_memory,
    execution_device,
    is_offloaded,
    load_offloaded,
    placed_blocks,
    placed_off_the_cpu,
)
from fptq_compile.runtime import OrtCausalLM
from fptq_compile.saving import save_compiled


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-block tiny Llama saved as several safetensors shards, and the model itself."""
    model = tiny_llama(layers=3)
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder, model


def test_blocks_stay_on_disk_and_the_model_computes_the_same_logits(checkpoint, token_ids):
    folder, model = checkpoint
    loaded = load_offloaded(folder).model
    layers = loaded.model.layers
    assert all(is_offloaded(layer) for layer in layers)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert loaded.model.embed_tokens.weight.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, model(token_ids).logits, rtol=0, atol=0)


def test_block_in_memory_is_a_plain_copy_holding_the_weights(checkpoint):
    folder, model = checkpoint
    layers = load_offloaded(folder).model.model.layers
    plain = block_in_memory(layers[1])
    assert not is_offloaded(plain) and not hasattr(plain, "_hf_hook")
    expected = model.model.layers[1].state_dict()
    assert plain.state_dict().keys() == expected.keys()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in layers[1].parameters())  # still on disk
    in_memory = model.model.layers[0]
    assert block_in_memory(in_memory) is in_memory


# Room in memory for what lies outside the blocks and block 0 of the 3-block tiny Llama
# (123 kB a block; accelerate keeps the biggest block's size free for reading offloaded ones).
BLOCK_0_IN_MEMORY = {"cpu": 300_000}


def test_a_memory_budget_puts_the_first_blocks_in_memory_and_the_rest_on_disk(checkpoint, token_ids):
    folder, model = checkpoint
    device_map = placed_blocks(model, BLOCK_0_IN_MEMORY)
    assert [device_map[f"model.layers.{index}"] for index in range(3)] == ["cpu", "disk", "disk"]
    # accelerate leaves the final norm on disk (it comes after the blocks): it is kept in memory.
    assert all(device == "cpu" for path, device in device_map.items() if not path.startswith("model.layers."))
    assert set(placed_blocks(model, {"cpu": 10**9}).values()) == {"cpu"}
    loaded = load_offloaded(folder, BLOCK_0_IN_MEMORY).model
    layers = loaded.model.layers
    assert [is_offloaded(layer) for layer in layers] == [False, True, True]
    assert placed_off_the_cpu(loaded) and not placed_off_the_cpu(model)
    assert all(execution_device(layer) == torch.device("cpu") for layer in layers)
    # Block 0, in memory under accelerate's hooks, is handed over without them, its tensors shared.
    plain = block_in_memory(layers[0])
    assert not any(hasattr(module, "_hf_hook") for module in plain.modules())
    assert hasattr(layers[0], "_hf_hook")
    assert all(a is b for a, b in zip(plain.parameters(), layers[0].parameters(), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, model(token_ids).logits, rtol=0, atol=0)


def test_a_budget_across_two_gpus_places_the_blocks_in_order(checkpoint):
    _, model = checkpoint
    # accelerate places by the budget alone (it warns that the GPUs are not here).
    device_map = placed_blocks(model, {0: 300_000, 1: 300_000})
    assert [device_map[f"model.layers.{index}"] for index in range(3)] == [0, 1, 1]
    assert device_map["model.embed_tokens"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here: the GPU placement has not run")
def test_blocks_on_a_gpu_and_on_disk_compile_as_well_as_on_the_cpu(checkpoint, token_ids):
    folder, model = checkpoint
    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=32), calibrate_by_block=True)
    loaded = load_offloaded(folder, {0: 300_000, "cpu": 150_000}).model
    assert next(loaded.model.layers[0].parameters()).device == torch.device("cuda", 0)
    assert all(execution_device(layer) == torch.device("cuda", 0) for layer in loaded.model.layers)
    on_gpu = fptq.compile(loaded, token_ids, config, progress=False).in_memory()
    on_cpu = fptq.compile(load_offloaded(folder).model, token_ids, config, progress=False).in_memory()
    assert {layer.module_path for layer in on_gpu.plan.layers} == {layer.module_path for layer in on_cpu.plan.layers}
    with torch.no_grad():
        reference = model(token_ids).logits

    def error(compiled):
        return float((compiled(token_ids) - reference).abs().max() / reference.abs().max())

    # GPU float32 products round otherwise than the CPU's: codes may differ, not the quality.
    assert error(on_gpu) <= 2 * error(on_cpu) + 1e-3


def test_a_memory_budget_is_read_from_device_and_size_pairs():
    assert parse_budget(["0=70GiB", "1=1000", "cpu=64GB"]) == {0: "70GiB", 1: 1000, "cpu": "64GB"}
    for entry, reason in [("gpu0=70GiB", "DEVICE=SIZE"), ("cpu", "DEVICE=SIZE"), ("0=lots", "not a size")]:
        with pytest.raises(fptq.ConfigError, match=reason):
            parse_budget([entry])
    with pytest.raises(fptq.ConfigError, match="needs offload"):
        JobConfig(model="folder", max_memory=("cpu=1GiB",))
    with pytest.raises(fptq.ConfigError, match="not a size"):
        JobConfig(model="folder", offload=True, max_memory=("cpu=1 lot",))


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_offloaded(tmp_path)
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_offloaded(tmp_path / "missing")


@pytest.mark.parametrize("budget", [None, BLOCK_0_IN_MEMORY], ids=["all_on_disk", "block_0_in_memory"])
@pytest.mark.parametrize("rounding", [fptq.WeightRounding.GPTQ, fptq.WeightRounding.NEAREST])
def test_an_offloaded_model_compiles_to_what_block_by_block_compilation_gives(checkpoint, token_ids, rounding, budget):
    folder, model = checkpoint
    # A 35 dB budget makes this model's plan mix static, LAE + static and dynamic groups.
    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(group_size=32, rounding=rounding),
        activations=fptq.ActivationConfig(min_sqnr_db=35.0),
        calibrate_by_block=True,
    )
    expected = fptq.compile(model, token_ids, config, progress=False)
    offloaded = fptq.compile(load_offloaded(folder, budget).model, token_ids, config, progress=False)
    # The meta-traced graph names some nodes differently: plans compare by module path.
    assert _by_module_path(offloaded.plan) == _by_module_path(expected.plan)
    assert len({group.activation.kind for group in offloaded.plan.groups}) == 3
    assert sorted(path.name for path in offloaded.offloaded.folder.iterdir()) == [
        f"block_{index:05d}.safetensors" for index in range(3)
    ]
    # Every block tensor is on disk, the graph holds meta tensors in their place.
    assert offloaded.offloaded.files and all(
        fetch_tensor(offloaded.graph_module, target).device.type == "meta" for target in offloaded.offloaded.files
    )
    with pytest.raises(fptq.UnsupportedGraphError, match="on disk"):
        offloaded(token_ids)
    loaded = offloaded.in_memory()
    expected_nodes = {layer.module_path: layer.node for layer in expected.plan.layers}
    for layer in loaded.plan.layers:
        for part in ("int4", "scale", "zero_point"):
            torch.testing.assert_close(
                fetch_tensor(loaded.graph_module, f"fptq_{layer.node}_weight_{part}"),
                fetch_tensor(expected.graph_module, f"fptq_{expected_nodes[layer.module_path]}_weight_{part}"),
                rtol=0,
                atol=0,
            )
    torch.testing.assert_close(loaded(token_ids), expected(token_ids), rtol=0, atol=0)
    assert offloaded.report.pass_reports["insert_w4a8_qdq"]["modified"]


def test_an_offloaded_model_needs_block_by_block_compilation(checkpoint, token_ids):
    folder, _ = checkpoint
    with pytest.raises(fptq.ConfigError, match="calibrate_by_block"):
        fptq.compile(load_offloaded(folder).model, token_ids, progress=False)


def _by_module_path(plan):
    """The plan's decisions keyed by module paths, not node names."""
    paths = {layer.node: layer.module_path for layer in plan.layers}
    groups = {
        tuple(paths[node] for node in group.linears): (
            group.activation,
            group.reason,
            None if group.fold is None else (group.fold.kind, group.fold.module_path),
            group.lae_scale,
            group.candidate,
            group.candidate_sqnr_db,
        )
        for group in plan.groups
    }
    return {layer.module_path: layer.weight for layer in plan.layers}, groups


@pytest.mark.parametrize("layout", [OnnxLayout.QDQ, OnnxLayout.ORT])
def test_an_offloaded_model_exports_without_reading_its_blocks_into_the_graph(checkpoint, token_ids, tmp_path, layout):
    folder, model = checkpoint
    config = fptq.CompileConfig(calibrate_by_block=True)
    expected = fptq.compile(model, token_ids, config, progress=False)
    offloaded = fptq.compile(load_offloaded(folder).model, token_ids, config, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export = export_onnx(offloaded, tmp_path / "model.onnx", layout)
    assert (tmp_path / "model.onnx.data").is_file()  # tensors streamed to external data
    assert export.int4_initializers == 2 * len(expected.plan.layers)  # codes and zero points
    if layout is OnnxLayout.ORT:
        assert export.fusions is not None and "compiled offloaded" in export.fusions.unfused_reason
        assert any("compiled offloaded" in str(warning.message) for warning in caught)
        # Every merged int4 linear (q/k/v, o, gate/up, down) still fuses into MatMulNBits.
        assert op_counts(optimized_by_ort(export.path, tmp_path))["MatMulNBits"] == 4 * 3
    # The graph still holds meta tensors in the blocks' place: nothing was read back into it.
    assert all(
        fetch_tensor(offloaded.graph_module, target).device.type == "meta" for target in offloaded.offloaded.files
    )
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    session = OrtCausalLM.load(export.path, exact=True)
    prefill, past = session.step(ids[:, :-1], expected.kv_layout.empty(2))
    decode, _ = session.step(ids[:, -1:], past)
    expected_prefill, expected_past = expected.step(ids[:, :-1], expected.kv_layout.empty(2))
    expected_decode, _ = expected.step(ids[:, -1:], expected_past)
    for actual, reference in ((prefill, expected_prefill), (decode, expected_decode)):
        assert float((actual - reference).abs().max() / reference.abs().max()) < 1e-5


def test_an_offloaded_compile_is_not_saved_but_its_folder_holds_the_onnx_model(checkpoint, token_ids, tmp_path):
    folder, _ = checkpoint
    nearest = fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST)
    config = fptq.CompileConfig(calibrate_by_block=True, weights=nearest)
    offloaded = fptq.compile(load_offloaded(folder).model, token_ids, config, progress=False)
    with pytest.raises(ExportError, match="offloaded"):
        save_compiled(offloaded, tmp_path / "saved")
    assert not list(tmp_path.iterdir())
    with pytest.warns(UserWarning, match="compiled offloaded") as warned:
        export_folder(offloaded, None, tmp_path / "out", progress=False)
    assert __file__ in [w.filename for w in warned if "compiled offloaded" in str(w.message)]  # the caller's line
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"model.onnx", "model.onnx.data", "plan.json", "compile_report.json", "report.json"} <= written
    assert not written & {"fptq_manifest.json", "weights.safetensors", "program.json"}
    assert fptq.QuantPlan.from_json((tmp_path / "out" / "plan.json").read_text()) == offloaded.plan
