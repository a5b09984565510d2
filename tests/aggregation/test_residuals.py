"""sum_residuals: exact sums of one module's residuals by concatenation or a float64 dense sum."""

from __future__ import annotations

import pytest
import torch
from agg_oracle import make_clients, rel
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation import Residual, aggregate_module, residual_layout, sum_layout, sum_residuals
from chorus_mq.errors import AggregationError

torch.set_num_threads(1)
F64 = torch.float64


def factored(d_out, d_in, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Residual(left=torch.randn(d_out, k, generator=gen), right=torch.randn(k, d_in, generator=gen))


def dense_sum(parts):
    return sum(p.to_dense().to(F64) for p in parts if p is not None)


def test_factored_parts_are_concatenated_without_refactorisation():
    parts = [factored(300, 200, 8, seed=s) for s in range(5)]
    total = sum_residuals(parts)
    assert total.dense is None and total.rank == 40  # every column kept: a copy, no SVD
    assert torch.equal(total.left[:, 8:16], parts[1].left)
    assert rel(total.to_dense(), dense_sum(parts)) < 1e-6


def test_the_sum_goes_dense_when_that_is_smaller_and_is_summed_in_float64():
    parts = [factored(40, 30, 6, seed=s) for s in range(4)]  # 24 * 70 > 40 * 30
    total = sum_residuals(parts)
    assert total.dense is not None and total.dense.dtype == torch.float32
    assert rel(total.to_dense(), dense_sum(parts)) < 1e-7
    # float64 accumulation: a float32 sum would lose the small part next to the cancelling ones
    big = torch.full((4, 3), 1e8)
    small = Residual(dense=torch.full((4, 3), 1.0))
    got = sum_residuals([Residual(dense=big), small, Residual(dense=-big)])
    assert torch.equal(got.dense, torch.ones(4, 3))


def test_a_dense_part_makes_the_sum_dense():
    parts = [factored(300, 200, 2), Residual(dense=torch.ones(300, 200)), None]
    total = sum_residuals(parts)
    assert total.dense is not None and rel(total.to_dense(), dense_sum(parts)) < 1e-7


def test_none_parts_are_zero():
    one = factored(30, 20, 2)
    assert sum_residuals([]) is None and sum_residuals([None, None]) is None
    assert sum_residuals([None, one, None]) is one


def test_parts_must_share_a_shape():
    with pytest.raises(AggregationError, match="shapes"):
        sum_residuals([factored(30, 20, 2), factored(30, 21, 2)])
    with pytest.raises(AggregationError, match="not a Residual"):
        sum_residuals([factored(30, 20, 2), torch.zeros(30, 20)])


def test_round_residuals_fold_into_an_exact_correction():
    """A continuing client folding ten rounds' residuals: the sum of the rounds, factored or dense."""
    rounds = [aggregate_module(make_clients(120, 100, [4, 4, 2], seed=s), "fedex-lora").residual for s in range(10)]
    correction = None
    for res in rounds:
        correction = sum_residuals([correction, res])
    assert rel(correction.to_dense(), dense_sum(rounds)) < 1e-6
    assert residual_layout(correction) == sum_layout([residual_layout(r) for r in rounds], 120, 100)


def test_residual_layout():
    assert residual_layout(None) == ("none", 0)
    assert residual_layout(factored(30, 20, 3)) == ("factored", 3)
    assert residual_layout(Residual(dense=torch.zeros(3, 2))) == ("dense", 0)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([], ("none", 0)),
        ([("none", 0), ("none", 0)], ("none", 0)),
        ([("factored", 4), ("none", 0), ("factored", 6)], ("factored", 10)),
        ([("factored", 4), ("dense", 0)], ("dense", 0)),
        ([("factored", 30), ("factored", 30)], ("dense", 0)),  # 60 * 150 > 100 * 50
    ],
)
def test_sum_layout(parts, expected):
    assert sum_layout(parts, 100, 50) == expected


@pytest.mark.parametrize(("parts", "message"), [([("sparse", 2)], "form"), ([("factored", -1)], "rank")])
def test_sum_layout_refuses_bad_parts(parts, message):
    with pytest.raises(AggregationError, match=message):
        sum_layout(parts, 10, 10)


@settings(max_examples=60, deadline=None)
@given(
    forms=st.lists(st.tuples(st.sampled_from(["none", "factored", "dense"]), st.integers(1, 8)), max_size=6),
    d_out=st.integers(1, 30),
    d_in=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
def test_sum_layout_predicts_the_sum(forms, d_out, d_in, seed):
    gen = torch.Generator().manual_seed(seed)
    parts: list[Residual | None] = []
    for form, k in forms:
        if form == "none":
            parts.append(None)
        elif form == "dense":
            parts.append(Residual(dense=torch.randn(d_out, d_in, generator=gen)))
        else:
            parts.append(Residual(left=torch.randn(d_out, k, generator=gen), right=torch.randn(k, d_in, generator=gen)))
    total = sum_residuals(parts)
    assert residual_layout(total) == sum_layout([residual_layout(p) for p in parts], d_out, d_in)
    if total is not None:
        expected = dense_sum(parts)
        assert float((total.to_dense().double() - expected).norm()) <= 1e-6 * max(1.0, float(expected.norm()))
