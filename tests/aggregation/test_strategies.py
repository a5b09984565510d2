"""The four strategies against a float64 dense oracle M = sum_i w_i s_i B_i A_i."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from agg_oracle import FREE, adapter_delta, make_clients, oracle, rel, total_delta

from chorus_mq.aggregation import ClientUpdate, aggregate_module, chain_residuals
from chorus_mq.aggregation.canonical import canonical_updates
from chorus_mq.errors import AggregationError

F64 = torch.float64
EXACT = ("fedex-lora", "svd", "stack")
# mixed ranks, rsLoRA scalings, unequal weights: the general case
MIXED = {"d_out": 48, "d_in": 40, "ranks": [4, 8, 6, 8], "rslora": True, "weights": [3.0, 1.0, 0.5, 2.0]}


def mixed_clients(dtype=torch.float32, seed=0):
    kw = dict(MIXED)
    return make_clients(kw.pop("d_out"), kw.pop("d_in"), kw.pop("ranks"), dtype=dtype, seed=seed, **kw)


@pytest.mark.parametrize("strategy", FREE)
def test_exactness_and_adapter_error_against_the_dense_oracle(strategy, record_property):
    clients = mixed_clients()
    m = oracle(clients)
    res = aggregate_module(clients, strategy)
    exact, adapter_only = rel(total_delta(res), m), rel(adapter_delta(res), m)
    record_property("exactness", exact)
    record_property("adapter_error", adapter_only)
    print(f"{strategy}: exactness {exact:.1e}, adapter-only error {adapter_only:.3f}")
    if strategy == "fedavg":
        # FedAvg is inexact by design: mean(B) @ mean(A) != mean(B @ A); it ships no residual.
        assert res.residual is None and exact > 0.1
    else:
        assert exact < 1e-6
    assert res.A.shape[1] == 40 and res.B.shape[0] == 48 and res.A.dtype == res.B.dtype == torch.float32


def test_svd_adapter_is_the_optimal_truncation():
    clients = mixed_clients()
    m = oracle(clients)
    for rank in (3, 8, 12):
        res = aggregate_module(clients, "svd", out_rank=rank)
        u, s, vh = torch.linalg.svd(m)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert res.scaling == 1.0 and res.A.shape == (rank, 40)
        assert rel(adapter_delta(res), best) < 1e-6
        assert rel(adapter_delta(res), m) == pytest.approx(float(s[rank:].norm() / m.norm()), rel=1e-6)
        # balanced factors: |B_j| = |A_j| = sqrt(s_j)
        assert torch.allclose(res.B.norm(dim=0), res.A.norm(dim=1), rtol=1e-5)
        assert torch.allclose(res.B.norm(dim=0) ** 2, s[:rank].float(), rtol=1e-5)


def test_svd_pads_when_asked_for_more_rank_than_there_is():
    clients = make_clients(30, 20, [2, 3])
    res = aggregate_module(clients, "svd", out_rank=8)
    assert res.A.shape == (8, 20) and not res.A[5:].any() and not res.B[:, 5:].any()
    assert res.residual is None
    assert rel(total_delta(res), oracle(clients)) < 1e-6


def canonical(clients, w):
    """The clients' canonical factors (what fedavg and fedex-lora average), for normalised weights ``w``."""
    return canonical_updates(clients, [float(wi) * c.scaling for wi, c in zip(w, clients, strict=True)])


def test_fedex_homogeneous_is_the_paper():
    """The paper's rule on the canonical factors: A and B are their weighted means."""
    clients = make_clients(20, 16, [4, 4, 4], weights=[1.0, 2.0, 1.0])
    res = aggregate_module(clients, "fedex-lora")
    w = torch.tensor([0.25, 0.5, 0.25], dtype=F64)
    canon = canonical(clients, w)
    assert torch.allclose(res.A.double(), sum(wi * c.A for wi, c in zip(w, canon, strict=True)), atol=1e-7)
    assert torch.allclose(res.B.double(), sum(wi * c.B for wi, c in zip(w, canon, strict=True)), atol=1e-6)
    assert res.scaling == clients[0].scaling
    m = oracle(clients)
    expected_residual = m - adapter_delta(res)
    assert rel(res.residual.to_dense(), expected_residual) < 1e-6


def test_fedex_mixed_ranks_zero_pads_and_rescales_b():
    clients = mixed_clients()
    res = aggregate_module(clients, "fedex-lora")
    s_out = clients[1].scaling  # the first client of the largest rank (8)
    assert res.scaling == s_out and res.A.shape == (8, 40)
    w = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=F64) / 6.5
    a = torch.zeros(8, 40, dtype=F64)
    b = torch.zeros(48, 8, dtype=F64)
    for wi, c in zip(w, canonical(clients, w), strict=True):
        r = c.A.shape[0]
        a[:r] += wi * c.A.double()
        b[:, :r] += wi * c.scaling / s_out * c.B.double()
    assert torch.allclose(res.A.double(), a, atol=1e-7) and torch.allclose(res.B.double(), b, atol=1e-6)


def test_fedavg_shares_fedex_factors():
    clients = mixed_clients()
    avg, fedex = aggregate_module(clients, "fedavg"), aggregate_module(clients, "fedex-lora")
    assert torch.equal(avg.A, fedex.A) and torch.equal(avg.B, fedex.B) and avg.scaling == fedex.scaling


def test_stack_is_exact_without_residual():
    clients = mixed_clients()
    res = aggregate_module(clients, "stack")
    assert res.A.shape == (26, 40) and res.scaling == 1.0 and res.residual is None
    assert rel(adapter_delta(res), oracle(clients)) < 1e-6


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", EXACT)
def test_low_precision_adapters_stay_exact(strategy, out_dtype):
    """The residual absorbs the rounding of a bf16/fp16 adapter."""
    clients = mixed_clients()
    res = aggregate_module(clients, strategy, out_dtype=out_dtype)
    assert res.A.dtype == res.B.dtype == out_dtype
    assert res.residual is not None
    assert rel(total_delta(res), oracle(clients)) < 1e-6


@pytest.mark.parametrize("strategy", EXACT)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_taken_at_their_values(strategy, in_dtype):
    clients = mixed_clients(dtype=in_dtype)
    res = aggregate_module(clients, strategy)
    assert rel(total_delta(res), oracle(clients)) < 1e-6


@pytest.mark.parametrize("strategy", EXACT)
def test_single_client_needs_no_residual(strategy):
    clients = make_clients(24, 20, [6], weights=[5.0])
    res = aggregate_module(clients, strategy)
    assert res.residual is None
    assert rel(adapter_delta(res), oracle(clients)) < 1e-6


@pytest.mark.parametrize("strategy", EXACT)
def test_more_rank_than_the_module_has(strategy):
    """K = 40 > min(d_out, d_in) = 12: dense is the smaller residual and the svd works on it."""
    clients = make_clients(12, 30, [8] * 5)
    res = aggregate_module(clients, strategy)
    assert rel(total_delta(res), oracle(clients)) < 1e-6
    if res.residual is not None and strategy == "fedex-lora":
        assert res.residual.dense is not None


@pytest.mark.parametrize("strategy", FREE)
def test_same_inputs_give_bit_identical_outputs(strategy):
    first, second = aggregate_module(mixed_clients(), strategy), aggregate_module(mixed_clients(), strategy)
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B) and first.scaling == second.scaling
    if first.residual is not None:
        r1, r2 = first.residual, second.residual
        for x, y in ((r1.left, r2.left), (r1.right, r2.right), (r1.dense, r2.dense)):
            assert (x is None and y is None) or torch.equal(x, y)
    chained = [chain_residuals(aggregate_module(mixed_clients(seed=1), "svd").residual, first.residual) for _ in "ab"]
    if chained[0] is not None:
        assert torch.equal(chained[0].to_dense(), chained[1].to_dense())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "mean"}, "unknown strategy"),
        ({"out_dtype": torch.int8}, "out_dtype"),
        ({"out_rank": 0}, "out_rank"),
        ({"out_rank": 2.5}, "out_rank"),
        ({"strategy": "fedex-lora", "out_rank": 4}, "only the svd"),
        ({"strategy": "stack", "out_rank": 10}, "only the svd"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(AggregationError, match=message):
        aggregate_module(mixed_clients(), **kwargs)


@pytest.mark.parametrize("strategy", FREE)
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.bfloat16])
def test_outputs_are_contiguous_for_writers(strategy, out_dtype):
    res = aggregate_module(mixed_clients(), strategy, out_dtype=out_dtype)
    parts = [res.A, res.B]
    if res.residual is not None:
        parts += [t for t in (res.residual.left, res.residual.right, res.residual.dense) if t is not None]
    assert all(t.is_contiguous() for t in parts)


def test_larger_out_rank_zero_pads_the_averaging_strategies():
    res = aggregate_module(mixed_clients(), "fedex-lora", out_rank=12)
    assert res.A.shape == (12, 40) and not res.A[8:].any()
    assert rel(total_delta(res), oracle(mixed_clients())) < 1e-6


def test_fp16_overflow_is_reported():
    clients = [ClientUpdate(A=torch.full((2, 4), 1e5), B=torch.full((3, 2), 1e5), scaling=1.0)]
    with pytest.raises(AggregationError, match="float16"):
        aggregate_module(clients, "svd", out_dtype=torch.float16)


def test_no_dense_matrix_for_a_large_module():
    """A 16384 x 16384 module would need 2 GiB dense in float64; the factored path needs ~10 MB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from chorus_mq.aggregation import ClientUpdate, aggregate_module
        torch.manual_seed(0)
        d = 16384
        ups = [ClientUpdate(A=torch.randn(8, d), B=torch.randn(d, 8), scaling=2.0, weight=1.0) for _ in range(4)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for strategy in ("fedex-lora", "svd", "stack"):
            aggregate_module(ups, strategy)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo)
    assert float(out.stdout.strip()) < 200  # MB of peak growth


@pytest.mark.parametrize("strategy", FREE)
@pytest.mark.parametrize("absent_weight", [0.0, 2.5])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_strategy_against_the_oracle_with_absent_weight(strategy, absent_weight, in_dtype):
    """Mixed ranks and rsLoRA scalings, unequal weights, clients that did not send the module."""
    clients = mixed_clients(dtype=in_dtype)
    res = aggregate_module(clients, strategy, absent_weight=absent_weight)
    m = oracle(clients, absent_weight)
    if strategy == "fedavg":
        assert res.residual is None and rel(total_delta(res), m) > 0.1
    else:
        assert rel(total_delta(res), m) < 1e-6


@pytest.mark.parametrize("strategy", FREE)
def test_absent_weight_is_a_zero_update_under_that_weight(strategy):
    clients = mixed_clients()
    zero = ClientUpdate(A=torch.zeros(8, 40), B=torch.zeros(48, 8), scaling=1.0, weight=2.5)
    with_zero = aggregate_module([*clients, zero], strategy)
    absent = aggregate_module(clients, strategy, absent_weight=2.5)
    assert rel(total_delta(absent), total_delta(with_zero)) < 1e-6
    if strategy in ("fedavg", "fedex-lora"):  # the factors are the weighted means over everyone
        assert torch.allclose(absent.A, with_zero.A, atol=1e-7) and torch.allclose(absent.B, with_zero.B, atol=1e-6)


def test_fedex_factors_with_absent_weight():
    clients = make_clients(20, 16, [4, 4], weights=[1.0, 3.0])
    res = aggregate_module(clients, "fedex-lora", absent_weight=4.0)
    w = [1.0 / 8, 3.0 / 8]  # normalised over 1 + 3 + 4
    canon = canonical(clients, w)
    assert torch.allclose(res.A.double(), w[0] * canon[0].A + w[1] * canon[1].A, atol=1e-7)
    assert torch.allclose(res.B.double(), w[0] * canon[0].B + w[1] * canon[1].B, atol=1e-6)
    assert rel(total_delta(res), oracle(clients, 4.0)) < 1e-6


def test_a_module_only_one_client_trains_is_not_that_clients():
    """The issue's attack: weight 0.0005 published its own module exactly; now it counts at its weight."""
    lone = make_clients(24, 20, [4], weights=[0.0005])
    res = aggregate_module(lone, "fedex-lora", absent_weight=0.9995)
    assert rel(adapter_delta(res) + res.residual.to_dense().double(), 0.0005 * oracle(lone)) < 1e-6
    assert float(total_delta(res).norm()) < 1e-3 * float(oracle(lone).norm())


def test_svd_residual_is_the_discarded_part_of_the_optimal_truncation():
    clients = make_clients(200, 150, [4, 8, 6, 8], rslora=True, weights=[3.0, 1.0, 0.5, 2.0])
    m = oracle(clients)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for rank in (3, 8):
        res = aggregate_module(clients, "svd", out_rank=rank)
        rest = (u[:, rank:] * s[rank:]) @ vh[rank:]
        assert rel(res.residual.to_dense(), rest) < 1e-6
        assert res.residual.rank == 26 - rank


def test_svd_swaps_sides_for_tall_modules_and_stays_exact():
    for d_out, d_in in ((400, 60), (60, 400)):
        clients = make_clients(d_out, d_in, [6, 6, 4])
        res = aggregate_module(clients, "svd", out_rank=5)
        assert res.residual.rank == 16 - 5
        assert rel(total_delta(res), oracle(clients)) < 1e-6


def test_svd_pads_the_residual_when_a_client_is_a_fresh_lora():
    clients = make_clients(80, 60, [4, 4, 4])
    clients[1] = ClientUpdate(A=clients[1].A, B=torch.zeros(80, 4), scaling=clients[1].scaling, weight=1.0)
    res = aggregate_module(clients, "svd")
    assert res.residual.rank == 12 - 4  # the layout's, though only 4 directions are nonzero
    assert not res.residual.left[:, 4:].any() and not res.residual.right[4:].any()
    assert rel(total_delta(res), oracle(clients)) < 1e-6


@pytest.mark.parametrize("strategy", FREE)
def test_a_nan_input_fails_clearly(strategy):
    clients = mixed_clients()
    bad = clients[2].A.clone()
    bad[0, 0] = math.nan
    clients[2] = ClientUpdate(A=bad, B=clients[2].B, scaling=clients[2].scaling, weight=clients[2].weight)
    with pytest.raises(AggregationError, match="the aggregate update is not finite"):
        aggregate_module(clients, strategy)


@pytest.mark.parametrize("strategy", FREE)
def test_finite_factors_whose_update_overflows_fail_clearly(strategy):
    big = [ClientUpdate(A=torch.full((2, 8), 1e19), B=torch.full((6, 2), 1e19), scaling=4.0, weight=1.0)]
    with pytest.raises(AggregationError, match="the aggregate update is not finite"):
        aggregate_module(big * 2, strategy)


def test_strategy_members_and_strings_give_the_same_result():
    for member in FREE:
        a, b = aggregate_module(mixed_clients(), member), aggregate_module(mixed_clients(), member.value)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.parametrize("strategy", FREE)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_never_modified(strategy, out_dtype):
    """float64 inputs are used without a copy (``.to`` returns them): nothing may write into them."""
    clients = mixed_clients(dtype=torch.float64)
    before = [(c.A.clone(), c.B.clone()) for c in clients]
    aggregate_module(clients, strategy, out_dtype=out_dtype, absent_weight=0.0)
    aggregate_module(clients, strategy, out_dtype=out_dtype, absent_weight=1.0)
    assert all(torch.equal(c.A, a) and torch.equal(c.B, b) for c, (a, b) in zip(clients, before, strict=True))
