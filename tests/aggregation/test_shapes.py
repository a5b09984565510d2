"""output_layout: the shapes of a module's aggregate from metadata alone, and that they are the real ones."""

from __future__ import annotations

import math
import re

import pytest
import torch
from agg_oracle import FREE, make_clients
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation import ClientMeta, ClientUpdate, OutputLayout, aggregate_module, output_layout
from chorus_mq.errors import AggregationError
from chorus_mq.names import Strategy

torch.set_num_threads(1)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def shapes(res) -> tuple:
    """(A, B, residual tensors) shapes and the adapter dtype, as a layout describes them."""
    parts: tuple = ()
    if res.residual is not None:
        r = res.residual
        parts = (tuple(r.dense.shape),) if r.dense is not None else (tuple(r.left.shape), tuple(r.right.shape))
    return tuple(res.A.shape), tuple(res.B.shape), parts, res.A.dtype


def predicted(layout: OutputLayout) -> tuple:
    (a, b), parts = layout.adapter_shapes, layout.residual_shapes
    return a, b, parts, layout.dtype


def meta(updates):
    return [ClientMeta.of(u) for u in updates]


@pytest.mark.parametrize("n", [2, 3, 10])
def test_fedex_residual_is_stored_at_its_exact_rank(n):
    """The issue's case: N clients of rank r leave a residual of rank (N - 1) r, not N r + r."""
    clients = make_clients(300, 200, [8] * n)
    res = aggregate_module(clients, "fedex-lora")
    assert res.residual.rank == (n - 1) * 8
    layout = output_layout("fedex-lora", meta(clients), 300, 200)
    assert (layout.residual, layout.residual_rank, layout.rank) == ("factored", (n - 1) * 8, 8)


def test_fedex_with_mixed_ranks_eliminates_a_client_of_least_rank():
    clients = make_clients(300, 200, [4, 8, 2, 6])
    assert aggregate_module(clients, "fedex-lora").residual.rank == 4 + 8 + 6


def test_absent_weight_keeps_every_client_in_the_fedex_residual():
    clients = make_clients(300, 200, [4, 8, 2])
    assert aggregate_module(clients, "fedex-lora", absent_weight=1.0).residual.rank == 14
    # a zero-scaling client (a zero update under its weight) is absent mass as well
    silent = [*clients, ClientUpdate(A=torch.ones(3, 200), B=torch.ones(300, 3), scaling=0.0, weight=2.0)]
    assert aggregate_module(silent, "fedex-lora").residual.rank == 14


def test_svd_residual_holds_the_discarded_directions():
    clients = make_clients(300, 200, [8] * 5)
    for rank in (4, 8, 20):
        assert aggregate_module(clients, "svd", out_rank=rank).residual.rank == 40 - rank
    assert aggregate_module(clients, "svd", out_rank=40).residual is None


@pytest.mark.parametrize("strategy", ["fedex-lora", "svd"])
def test_a_low_precision_adapter_keeps_the_concatenation(strategy):
    clients = make_clients(300, 200, [8] * 4)
    res = aggregate_module(clients, strategy, out_dtype=torch.bfloat16)
    assert res.residual.rank == 32 + 8


def test_stack_cast_error_takes_twice_its_rank():
    clients = make_clients(300, 200, [3, 5])
    assert aggregate_module(clients, "stack", out_dtype=torch.float16).residual.rank == 16
    assert aggregate_module(clients, "stack").residual is None


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype", "residual"),
    [
        (torch.bfloat16, torch.bfloat16, "none"),  # the cast keeps the lone client's values
        (torch.float16, torch.float32, "none"),
        (torch.float32, torch.bfloat16, "factored"),  # it does not: the cast error is a residual
        (torch.float16, torch.bfloat16, "factored"),
        (torch.float64, torch.float32, "none"),  # fp32 adapters never carry their own rounding
    ],
)
def test_a_lone_client_has_a_residual_only_when_the_cast_changes_it(in_dtype, out_dtype, residual):
    clients = make_clients(300, 200, [6], dtype=in_dtype, weights=[3.0])
    layout = output_layout("fedex-lora", meta(clients), 300, 200, out_dtype=out_dtype)
    assert layout.residual == residual
    assert shapes(aggregate_module(clients, "fedex-lora", out_dtype=out_dtype)) == predicted(layout)
    # with weight absent the lone client's update is scaled down: never representable by its factors alone
    absent = output_layout("fedex-lora", meta(clients), 300, 200, absent_weight=1.0, out_dtype=out_dtype)
    assert absent.residual == "factored"


def test_dense_when_that_is_smaller():
    clients = make_clients(12, 10, [4, 4, 4])  # (3 - 1) * 4 = 8 columns: 8 * 22 > 120
    layout = output_layout("fedex-lora", meta(clients), 12, 10)
    assert (layout.residual, layout.residual_rank, layout.residual_shapes) == ("dense", 0, ((12, 10),))
    assert aggregate_module(clients, "fedex-lora").residual.dense is not None


def test_scaling_comes_from_the_first_client_of_largest_rank_that_counts():
    clients = make_clients(30, 20, [2, 8, 8, 4], weights=[1.0, 0.0, 1.0, 1.0])
    layout = output_layout(Strategy.FEDEX_LORA, meta(clients), 30, 20)
    assert layout.scaling_from == 2 and layout.rank == 8
    assert aggregate_module(clients, "fedex-lora").scaling == clients[2].scaling
    assert output_layout("svd", meta(clients), 30, 20).scaling_from == -1


def test_bare_ranks_mean_unit_weight_and_scaling():
    assert output_layout("fedex-lora", [4, 4, 4], 300, 200) == output_layout(
        "fedex-lora", [ClientMeta(rank=4)] * 3, 300, 200
    )
    layout = output_layout("stack", [4, 2], 300, 200)
    assert layout.adapter_shapes == ((6, 200), (300, 6)) and layout.residual_shapes == ()
    assert layout.residual_nbytes == 0
    fedex = output_layout("fedex-lora", [4, 4], 300, 200)
    assert fedex.residual_nbytes == 4 * 4 * (300 + 200)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "mean"}, "unknown strategy"),
        ({"absent_weight": -1.0}, "absent_weight"),
        ({"absent_weight": math.nan}, "absent_weight"),
        ({"absent_weight": True}, "absent_weight"),
        ({"absent_weight": "some"}, "absent_weight"),
        ({"out_rank": 0}, "out_rank"),
        ({"out_dtype": torch.int32}, "out_dtype"),
        ({"clients": []}, "empty"),
        ({"clients": [0]}, "rank"),
        ({"clients": [ClientMeta(rank=2, weight=-1.0)]}, "weight"),
        ({"clients": [ClientMeta(rank=2, scaling=math.inf)]}, "scaling"),
        ({"clients": [ClientMeta(rank=2, weight=0.0)]}, "all weights are zero"),
        ({"clients": [ClientMeta(rank=2, scaling=0.0)]}, "zero scaling"),
        ({"clients": [ClientMeta(rank=2, dtype=torch.int8)]}, "floating"),
        ({"d_out": 0}, "1 x 1"),
    ],
)
def test_bad_metadata_raises(kwargs, message):
    args = {"strategy": "fedex-lora", "clients": [4, 4], "d_out": 30, "d_in": 20} | kwargs
    with pytest.raises(AggregationError, match=message):
        output_layout(
            args.pop("strategy"),
            args.pop("clients"),
            args.pop("d_out"),
            args.pop("d_in"),
            **args,
        )


@st.composite
def rounds(draw):
    n = draw(st.integers(1, 6))
    d_out, d_in = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n))
    alpha = draw(st.sampled_from([0.0, 1.0, 16.0]))  # alpha 0: a zero-scaling client
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=n, max_size=n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    updates = [
        ClientUpdate(
            A=torch.randn(r, d_in, generator=gen).to(dt),
            # a fresh LoRA's B is zero: directions the svd finds fewer of than its layout holds
            B=(torch.randn(d_out, r, generator=gen) * draw(st.sampled_from([0.0, 1.0]))).to(dt),
            scaling=(alpha if i else 8.0) / math.sqrt(r),
            weight=w,
        )
        for i, (r, w, dt) in enumerate(zip(ranks, weights, dtypes, strict=True))
    ]
    return updates, d_out, d_in


@settings(max_examples=150, deadline=None)
@given(
    case=rounds(),
    strategy=st.sampled_from(FREE),
    out_dtype=st.sampled_from(DTYPES),
    absent_weight=st.sampled_from([0.0, 0.0, 0.7, 5.0]),
    out_rank=st.one_of(st.none(), st.integers(1, 40)),
)
def test_the_layout_is_the_actual_shape(case, strategy, out_dtype, absent_weight, out_rank):
    updates, d_out, d_in = case
    kwargs = {"absent_weight": absent_weight, "out_rank": out_rank, "out_dtype": out_dtype}
    try:
        layout = output_layout(strategy, meta(updates), d_out, d_in, **kwargs)
    except AggregationError as exc:
        with pytest.raises(AggregationError, match=re.escape(str(exc).split(";")[0][:30])):
            aggregate_module(updates, strategy, **kwargs)
        return
    assert shapes(aggregate_module(updates, strategy, **kwargs)) == predicted(layout)
