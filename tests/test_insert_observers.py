from __future__ import annotations

import collections

import pytest
import torch

from fptq_compile.calibration import run_calibration
from fptq_compile.errors import CalibrationError
from fptq_compile.graph_utils import probes_only
from fptq_compile.passes import ActivationObserver, insert_observers, read_activation_stats, remove_observers


def _observer_nodes(graph_module):
    return [n for n in graph_module.graph.nodes if n.op == "call_module" and "observer" in str(n.target)]


def test_one_observer_per_distinct_linear_input(captured):
    code_before = captured.graph_module.code
    result = insert_observers(captured.graph_module, captured.linears)
    assert result.modified
    distinct_inputs = {site.input_node for site in captured.linears}
    observers = _observer_nodes(captured.graph_module)
    assert len(observers) == len(distinct_inputs) == result.report["observers"]
    # Every linear now reads an observer; q/k/v read the same one.
    readers = collections.Counter(n.users.__len__() for n in observers)
    assert max(readers) == 3
    for site in captured.linears:
        linear = next(n for n in captured.graph_module.graph.nodes if n.name == site.node)
        assert linear.args[0].op == "call_module"
    assert remove_observers(captured.graph_module).modified
    assert captured.graph_module.code == code_before
    assert not any(isinstance(m, ActivationObserver) for m in captured.graph_module.modules())


def _linear_inputs(llama, token_ids) -> dict[str, torch.Tensor]:
    """Every linear's input tokens ``[n, in_features]`` in one eager forward, by module path."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:  # a hook returning None keeps the output
        seen[name] = inputs[0].detach()

    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: record(name, i))
        for name, module in llama.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        llama(token_ids)
    for handle in handles:
        handle.remove()
    return {name: x.reshape(-1, x.shape[-1]) for name, x in seen.items()}


def _calibrated_stats(captured, token_ids, hessian_dtype=None):
    insert_observers(captured.graph_module, captured.linears, hessian_dtype)
    run_calibration(captured.logits, token_ids, batch_size=3, progress=False)
    stats = read_activation_stats(captured.graph_module)
    remove_observers(captured.graph_module)
    return stats


def test_statistics_equal_a_direct_measurement(llama, captured, token_ids):
    stats = _calibrated_stats(captured, token_ids)
    inputs = _linear_inputs(llama, token_ids)
    for site in captured.linears:
        torch.testing.assert_close(stats[site.node].channel_absmax, inputs[site.module_path].abs().amax(dim=0))
        assert stats[site.node].num_tokens == token_ids.numel()


def test_the_graph_cut_to_its_observers_measures_the_same_without_computing_logits(llama, captured, token_ids):
    insert_observers(captured.graph_module, captured.linears)
    cut = probes_only(captured.graph_module, ActivationObserver)

    def linears(graph_module):
        return [node.name for node in graph_module.graph.nodes if node.target == torch.ops.aten.linear.default]

    lm_head = next(site.node for site in captured.linears if site.module_path == "lm_head")
    assert set(linears(captured.graph_module)) - set(linears(cut)) == {lm_head}  # observed, not computed
    outputs = torch.utils._pytree.tree_leaves(captured.run(token_ids, module=cut), is_leaf=lambda x: x is None)
    assert len(outputs) == 1 + 2 * 2 and all(value is None for value in outputs)  # logits, 2 layers' key/value
    stats = read_activation_stats(captured.graph_module)
    inputs = _linear_inputs(llama, token_ids)
    for site in captured.linears:
        torch.testing.assert_close(stats[site.node].channel_absmax, inputs[site.module_path].abs().amax(dim=0))


def test_inserting_twice_changes_nothing_the_second_time(captured):
    insert_observers(captured.graph_module, captured.linears)
    code = captured.graph_module.code
    assert not insert_observers(captured.graph_module, captured.linears).modified
    assert captured.graph_module.code == code


def test_removing_from_a_graph_without_observers_is_a_no_op(captured):
    code = captured.graph_module.code
    assert not remove_observers(captured.graph_module).modified
    assert captured.graph_module.code == code


def test_reading_before_calibration_is_a_clear_error(captured):
    insert_observers(captured.graph_module, captured.linears)
    with pytest.raises(CalibrationError, match="saw no data"):
        read_activation_stats(captured.graph_module)


@pytest.mark.parametrize("hessian_dtype", [torch.float32, torch.bfloat16])
def test_hessians_equal_a_direct_measurement(llama, captured, token_ids, hessian_dtype):
    # Calibrated in batches of 3 rows, measured here in one: the sums must agree.
    stats = _calibrated_stats(captured, token_ids, hessian_dtype)
    inputs = _linear_inputs(llama, token_ids)
    for site in captured.linears:
        tokens = inputs[site.module_path].to(hessian_dtype).float()
        expected = tokens.t() @ tokens / tokens.shape[0]
        torch.testing.assert_close(stats[site.node].hessian, expected, rtol=1e-4, atol=1e-4)


def test_hessians_are_only_collected_on_request(captured, token_ids):
    insert_observers(captured.graph_module, captured.linears)
    run_calibration(captured.logits, token_ids, batch_size=2, progress=False)
    stats = read_activation_stats(captured.graph_module)
    assert all(channel.hessian is None for channel in stats.per_linear.values())
