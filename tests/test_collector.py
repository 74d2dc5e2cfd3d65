from __future__ import annotations

import gc

import pytest

import fptq_compile as fptq
from fptq_compile.collector import GRAPH_BUILDING_THRESHOLDS, fewer_collections


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_thresholds_are_raised_inside_and_restored_after_even_on_error(thresholds):
    gc.set_threshold(700, 10, 10)
    with fewer_collections():
        assert gc.get_threshold() == GRAPH_BUILDING_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("a failed compile")
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("callers", [(0, 10, 10), (500_000, 10, 10)])
def test_a_caller_with_collection_off_or_rarer_keeps_its_thresholds(callers, thresholds):
    gc.set_threshold(*callers)
    with fewer_collections():
        assert gc.get_threshold() == callers
    assert gc.get_threshold() == callers


def test_the_library_calls_restore_the_callers_thresholds(thresholds, token_ids):
    from conftest import tiny_llama

    gc.set_threshold(700, 10, 10)
    seen = []

    def watching(*args, **kwargs):  # a pass that records the thresholds compile runs under
        seen.append(gc.get_threshold())
        from fptq_compile.passes.base import PassResult

        return PassResult(args[0], modified=False, report={})

    fptq.compile(tiny_llama(), token_ids[:2], passes=(watching,), progress=False)
    assert seen == [GRAPH_BUILDING_THRESHOLDS]
    assert gc.get_threshold() == (700, 10, 10)
