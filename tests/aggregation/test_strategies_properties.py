"""Property tests: any mix of clients, ranks, weights, absent weight, dtypes and output dtypes stays exact."""

from __future__ import annotations

import math

import torch
from agg_oracle import FREE, oracle, total_delta
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation import ClientUpdate, aggregate_module, chain_residuals

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def federations(draw):
    n = draw(st.integers(1, 8))
    d_out, d_in = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 100.0]), min_size=n, max_size=n))
    if not any(weights):
        weights[0] = 1.0
    rslora = draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 8.0, 32.0]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return [
        ClientUpdate(
            A=torch.randn(r, d_in, generator=gen).to(dtype),
            B=torch.randn(d_out, r, generator=gen).to(dtype),
            scaling=alpha / (math.sqrt(r) if rslora else r),
            weight=w,
        )
        for r, w in zip(ranks, weights, strict=True)
    ]


@settings(max_examples=60, deadline=None)
@given(
    updates=federations(),
    strategy=st.sampled_from(FREE),
    out_dtype=st.sampled_from(DTYPES),
    absent_weight=st.sampled_from([0.0, 0.0, 0.5, 4.0]),
)
def test_any_federation_is_aggregated_exactly(updates, strategy, out_dtype, absent_weight):
    res = aggregate_module(updates, strategy, out_dtype=out_dtype, absent_weight=absent_weight)
    d_out, d_in = updates[0].B.shape[0], updates[0].A.shape[1]
    assert res.A.dtype == res.B.dtype == out_dtype
    assert res.A.shape[1] == d_in and res.B.shape[0] == d_out and res.A.shape[0] == res.B.shape[1]
    if res.residual is not None:
        assert res.residual.shape == (d_out, d_in)
    if strategy == "fedavg":
        assert res.residual is None
    else:
        want = oracle(updates, absent_weight)
        # float32 rounds each client's term, so the error scales with the terms, not with their sum: where
        # the clients cancel (a 1x1 module of terms near 1 summing to 4e-4) it is relative to the terms
        total = math.fsum(u.weight for u in updates) + absent_weight
        terms = math.fsum(float((u.weight / total * u.scaling) * (u.B.double() @ u.A.double()).norm()) for u in updates)
        err = float((total_delta(res) - want).norm())
        assert err < 1e-5 * max(float(want.norm()), terms), (err, float(want.norm()), terms)


@settings(max_examples=30, deadline=None)
@given(rounds=st.lists(federations(), min_size=2, max_size=4))
def test_chained_residuals_equal_the_sum(rounds):
    shape = rounds[0][0].B.shape[0], rounds[0][0].A.shape[1]
    rounds = [r for r in rounds if (r[0].B.shape[0], r[0].A.shape[1]) == shape]
    chained, expected = None, torch.zeros(shape, dtype=torch.float64)
    for updates in rounds:
        res = aggregate_module(updates, "svd", out_rank=1).residual
        if res is not None:
            expected += res.to_dense().double()
        chained = chain_residuals(chained, res)
    if chained is None:
        assert expected.norm() <= 1e-6 * max(1.0, float(expected.abs().max()))
    else:
        assert float((chained.to_dense().double() - expected).norm()) <= 1e-5 * float(expected.norm())
