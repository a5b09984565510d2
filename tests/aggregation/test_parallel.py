"""Modules side by side: order, bounded memory, errors, and results independent of the worker count."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from agg_oracle import make_clients

from chorus_mq.aggregation import aggregate_module, chain_residuals, map_ordered
from chorus_mq.aggregation.parallel import default_workers
from chorus_mq.errors import AggregationError


def test_results_come_back_in_input_order():
    # later items finish first; the order of the results must not follow
    out = list(map_ordered(lambda i: time.sleep(0.02 * (5 - i)) or i * i, range(6), workers=3))
    assert out == [i * i for i in range(6)]


def test_inputs_are_consumed_lazily_with_a_bounded_window():
    produced, lock, most_ahead = [], threading.Lock(), [0]
    consumed = 0

    def items():
        for i in range(20):
            with lock:
                produced.append(i)
                most_ahead[0] = max(most_ahead[0], len(produced) - consumed)
            yield i

    for _ in map_ordered(lambda i: i, items(), workers=2):
        consumed += 1
    assert consumed == 20
    assert most_ahead[0] <= 2 + 1 + 1  # workers + 1 in flight, plus the one being yielded


def test_each_module_runs_on_one_torch_thread_and_the_caller_keeps_its_own():
    before = torch.get_num_threads()
    seen = set(map_ordered(lambda _: torch.get_num_threads(), range(4), workers=2))
    assert seen == {1}
    assert torch.get_num_threads() == before


def test_the_first_error_in_order_is_raised_and_the_rest_cancelled():
    ran = []

    def fn(i):
        ran.append(i)
        if i in (3, 5):
            raise AggregationError(f"bad module {i}")
        return i

    got = []
    with pytest.raises(AggregationError, match="bad module 3"):
        for value in map_ordered(fn, range(50), workers=2):
            got.append(value)
    assert got == [0, 1, 2]
    assert len(ran) < 50  # nothing past the window was started


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(AggregationError, match="workers must be a positive int"):
        list(map_ordered(lambda i: i, range(3), workers=workers))


def test_default_workers_is_the_cores_this_process_may_use():
    assert default_workers() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("strategy", ["fedex-lora", "svd", "stack"])
def test_results_are_bit_identical_for_any_worker_count(strategy):
    modules = [make_clients(96, 80, [4, 8, 6], seed=s) for s in range(6)]
    runs = [list(map_ordered(lambda m: aggregate_module(m, strategy), modules, workers=w)) for w in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=False):
            assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
            assert (a.residual is None) == (b.residual is None)
            if a.residual is not None:
                assert torch.equal(a.residual.to_dense(), b.residual.to_dense())
    # chaining (the compression) too
    pairs = list(zip(runs[0][::2], runs[0][1::2], strict=False))
    chained = [
        list(map_ordered(lambda p: chain_residuals(p[0].residual, p[1].residual), pairs, workers=w)) for w in (1, 2)
    ]
    for a, b in zip(*chained, strict=False):
        assert (a is None and b is None) or torch.equal(a.to_dense(), b.to_dense())


def test_an_error_while_loading_inputs_propagates_after_the_started_work_ends():
    finished = []

    def items():
        yield from range(3)
        raise AggregationError("module 3 does not load")

    def fn(i):
        time.sleep(0.05)
        finished.append(i)
        return i

    got = []
    with pytest.raises(AggregationError, match="module 3 does not load"):
        for value in map_ordered(fn, items(), workers=2):
            got.append(value)
    assert got == [0]  # yielded before the loader failed
    assert not [t for t in threading.enumerate() if t.name.startswith("chorus-module")]  # pool shut down
