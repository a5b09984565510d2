"""Input validation, weight normalisation, the finiteness check and the float64 weighted mean."""

from __future__ import annotations

import math

import pytest
import torch
from agg_oracle import make_clients

from chorus_mq.aggregation import ClientMeta, ClientUpdate, ModuleResult, Residual, aggregate_module, weighted_mean
from chorus_mq.aggregation.strategies import prepare
from chorus_mq.aggregation.updates import check_finite
from chorus_mq.errors import AggregationError


def update(r=2, d_out=5, d_in=4, **kw):
    return ClientUpdate(A=torch.randn(r, d_in), B=torch.randn(d_out, r), scaling=kw.pop("scaling", 1.0), **kw)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "empty"),
        ([update(), update(d_out=6)], "same module"),
        ([update(), update(d_in=3)], "same module"),
        ([ClientUpdate(A=torch.randn(2, 4), B=torch.randn(5, 3), scaling=1.0)], "rank"),
        ([ClientUpdate(A=torch.randn(0, 4), B=torch.randn(5, 0), scaling=1.0)], "rank"),
        ([ClientUpdate(A=torch.randn(2, 4, 1), B=torch.randn(5, 2), scaling=1.0)], "2-D"),
        ([ClientUpdate(A=torch.ones(2, 4, dtype=torch.int32), B=torch.randn(5, 2), scaling=1.0)], "floating"),
        ([update(weight=-1.0)], "weight"),
        ([update(weight=math.nan)], "weight"),
        ([update(weight=0.0), update(weight=0.0)], "zero"),
        ([update(scaling=-2.0)], "scaling"),
        ([update(scaling=math.inf)], "scaling"),
        ([update(scaling=None)], "scaling"),
        ([update(weight="heavy")], "weights must be numbers"),
        ([update(scaling=0.0)], "zero scaling"),
        ([(torch.randn(2, 4), torch.randn(5, 2))], "ClientUpdate"),
    ],
)
def test_bad_inputs_raise_aggregation_error(updates, message):
    with pytest.raises(AggregationError, match=message):
        aggregate_module(updates)


def test_weights_are_normalised_and_zero_weight_clients_dropped():
    clients = make_clients(6, 5, [2, 3, 2], weights=[2.0, 0.0, 6.0])
    p = prepare(clients)
    assert [u.A.shape[0] for u in p.updates] == [2, 2]
    assert p.weights == (0.25, 0.75)
    assert p.products == (0.25 * clients[0].scaling, 0.75 * clients[2].scaling)


def test_zero_weight_clients_do_not_change_the_result():
    clients = make_clients(6, 5, [2, 3, 2], weights=[2.0, 0.0, 6.0])
    with_zero = aggregate_module(clients, "svd")
    without = aggregate_module([clients[0], clients[2]], "svd")
    assert torch.equal(with_zero.A, without.A) and torch.equal(with_zero.B, without.B)


def test_scalings_may_be_any_real_number_type():
    clients = make_clients(6, 5, [2, 3])
    as_tensor = [
        ClientUpdate(A=c.A, B=c.B, scaling=torch.tensor(c.scaling, dtype=torch.float64), weight=c.weight)
        for c in clients
    ]
    assert torch.equal(aggregate_module(as_tensor, "svd").A, aggregate_module(clients, "svd").A)


def test_out_scaling_is_the_first_max_rank_client():
    clients = make_clients(6, 5, [2, 4, 4], rslora=True)
    clients[2] = ClientUpdate(A=clients[2].A, B=clients[2].B, scaling=99.0, weight=1.0)
    assert prepare(clients).layout.scaling_from == 1
    assert aggregate_module(clients, "fedex-lora").scaling == clients[1].scaling


def test_weighted_mean_accumulates_in_float64_and_keeps_the_dtype():
    halves = [torch.full((3,), 1.0, dtype=torch.bfloat16), torch.full((3,), 2.0, dtype=torch.float32)]
    out = weighted_mean(halves, [1.0, 3.0])
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.full((3,), 1.75, dtype=torch.bfloat16))
    # float32 accumulation would return 0 here: 1e8 / 3 swallows 1 / 3
    big = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert weighted_mean(big, [1.0, 1.0, 1.0]).item() == pytest.approx(1 / 3, rel=1e-6)


def test_weighted_mean_ignores_zero_weights_and_checks_inputs():
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(weighted_mean([a, b], [3.0, 0.0]), a)
    with pytest.raises(AggregationError):
        weighted_mean([], [])
    with pytest.raises(AggregationError):
        weighted_mean([a, torch.randn(2, 4)], [1.0, 1.0])
    with pytest.raises(AggregationError):
        weighted_mean([a, b], [1.0])
    with pytest.raises(AggregationError):
        weighted_mean([torch.ones(2, dtype=torch.int64)], [1.0])


def test_client_meta_is_what_the_layout_needs():
    u = ClientUpdate(
        A=torch.randn(3, 5, dtype=torch.bfloat16), B=torch.randn(4, 3), scaling=torch.tensor(2.0), weight=7
    )
    assert ClientMeta.of(u) == ClientMeta(rank=3, scaling=2.0, weight=7.0, dtype=torch.float32)


def test_weighted_mean_of_non_finite_tensors_fails_clearly():
    with pytest.raises(AggregationError, match="not finite"):
        weighted_mean([torch.tensor([1.0, math.nan]), torch.ones(2)], [1.0, 1.0])
    with pytest.raises(AggregationError, match="not finite"):  # finite inputs, an fp16 overflow on the way out
        weighted_mean([torch.tensor([6e4], dtype=torch.float16), torch.tensor([1e5])], [1.0, 1.0])


def test_check_finite_passes_finite_results_and_names_the_problem():
    ok = ModuleResult(A=torch.ones(2, 3), B=torch.ones(4, 2), scaling=1.0, residual=None)
    assert check_finite(ok) is ok
    inf_res = ModuleResult(A=torch.ones(2, 3), B=torch.ones(4, 2), scaling=1.0,
                           residual=Residual(dense=torch.full((4, 3), math.inf)))  # fmt: skip
    with pytest.raises(AggregationError, match="the aggregate update is not finite"):
        check_finite(inf_res)
    huge = Residual(left=torch.full((4, 1), 1e20), right=torch.full((1, 3), 1e20))
    overflow = ModuleResult(A=torch.ones(2, 3), B=torch.ones(4, 2), scaling=1.0, residual=huge)
    with pytest.raises(AggregationError, match="exceeds float32"):
        check_finite(overflow)
    # a loose bound above float32's range is not an error: only the exact norm decides
    cancelling = ModuleResult(A=torch.tensor([[1e20, 0.0]]), B=torch.tensor([[0.0], [1e-20]]), scaling=1e10,
                              residual=None)  # fmt: skip
    assert check_finite(cancelling) is cancelling


@pytest.mark.parametrize("absent", [-0.5, math.inf, math.nan, None])
def test_bad_absent_weight_raises(absent):
    with pytest.raises(AggregationError, match="absent_weight"):
        aggregate_module(make_clients(6, 5, [2, 3]), absent_weight=absent)
