"""Factored SVD without the dense matrix, exact compression and chained residuals."""

from __future__ import annotations

import pytest
import torch
from agg_oracle import make_clients, rel

from chorus_mq.aggregation import Residual, aggregate_module, chain_residuals
from chorus_mq.aggregation.lowrank import RTOL, compress, factored_svd, split_svd
from chorus_mq.errors import AggregationError

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(
    ("d_out", "d_in", "k"),
    [(50, 40, 12), (30, 60, 12), (8, 50, 20)],  # the last has k > d_out: the dense path
)
def test_factored_svd_matches_the_dense_svd(d_out, d_in, k):
    left, right, mid = rand(d_out, k), rand(k, d_in, seed=1), rand(k, seed=2).abs() + 0.1
    dense = (left * mid) @ right
    u, v = factored_svd(left, right, mid)
    assert rel(u @ v, dense) < 1e-12
    sigma = torch.linalg.svdvals(dense)
    got = u.norm(dim=0) * v.norm(dim=1)  # balanced: |u_j| |v_j| = s_j
    assert torch.allclose(got, sigma[: got.numel()], rtol=1e-9, atol=1e-12 * float(sigma[0]))
    assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-9)
    gram = (u / u.norm(dim=0)).mT @ (u / u.norm(dim=0))
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=F64), atol=1e-9)


def test_factored_svd_handles_rank_deficient_and_zero_columns():
    base_l, base_r = rand(40, 6), rand(6, 30, seed=1)
    # duplicated columns (identical clients) and an all-zero client (a fresh LoRA B)
    left = torch.cat([base_l, base_l, torch.zeros(40, 6)], 1)
    right = torch.cat([base_r, base_r, rand(6, 30, seed=2)], 0)
    u, v = factored_svd(left, right)
    assert rel(u @ v, left @ right) < 1e-12
    u, v = factored_svd(left, right, drop_after=0)
    assert u.shape[1] == 6  # the true rank
    assert rel(u @ v, left @ right) < 1e-12


def test_factored_svd_of_zero_is_empty():
    u, v = factored_svd(torch.zeros(5, 3, dtype=F64), rand(3, 4))
    assert u.shape == (5, 0) and v.shape == (0, 4)


def test_only_numerically_zero_directions_are_dropped():
    u0, v0 = torch.linalg.qr(rand(30, 4))[0], torch.linalg.qr(rand(20, 4, seed=1))[0].T
    sigma = torch.tensor([1.0, 1e-3, 0.5 * RTOL, 0.0], dtype=F64)
    left, right = u0 * sigma, v0
    assert factored_svd(left, right, drop_after=0)[0].shape[1] == 2
    assert factored_svd(left, right, drop_after=3)[0].shape[1] == 3  # the first n always stay
    assert factored_svd(left, right)[0].shape[1] == 3  # nothing dropped; the zero column is not live
    assert factored_svd(left, right, drop_after=0, roundoff=0.01)[0].shape[1] == 1


def test_compress_is_exact_and_minimal():
    left = torch.cat([rand(60, 5), rand(60, 5)], 1).float()
    right = torch.cat([rand(5, 50, seed=1), -rand(5, 50, seed=1)], 0).float()  # cancels half
    right[5:] *= 0.5
    res = compress(left, right)
    assert res.rank == 5
    assert rel(res.to_dense(), left.double() @ right.double()) < 1e-6


def test_chain_with_none_and_shape_checks():
    res = Residual(left=torch.ones(3, 1), right=torch.ones(1, 2))
    assert chain_residuals(None, None) is None
    assert chain_residuals(None, res) is res and chain_residuals(res, None) is res
    with pytest.raises(AggregationError):
        chain_residuals(res, Residual(left=torch.ones(3, 1), right=torch.ones(1, 3)))


def test_chain_of_opposite_residuals_is_none():
    res = Residual(dense=torch.ones(3, 2))
    assert chain_residuals(res, Residual(dense=-torch.ones(3, 2))) is None


def test_ten_rounds_in_a_shared_subspace_stay_exact_and_low_rank():
    """Clients that move in one p-dim subspace: every residual lives there, so must the chain."""
    d_out, d_in, p = 96, 80, 10
    u0, v0 = torch.linalg.qr(rand(d_out, p))[0], torch.linalg.qr(rand(d_in, p, seed=1))[0]
    chained, expected = None, torch.zeros(d_out, d_in, dtype=F64)
    for rnd in range(10):
        clients = make_clients(p, p, [4, 4, 3], seed=rnd)
        clients = [
            type(c)(A=(c.A.double() @ v0.T).float(), B=(u0 @ c.B.double()).float(), scaling=c.scaling, weight=c.weight)
            for c in clients
        ]
        res = aggregate_module(clients, "svd").residual
        # one round's residual holds the K - r discarded directions; its content has rank <= p - r
        assert res.rank == 11 - 4 and compress(res.left, res.right).rank <= p - 4
        expected += res.to_dense().to(F64)
        chained = chain_residuals(chained, res)
        assert chained.rank <= (p if rnd else res.rank)
    assert chained.dense is None
    assert rel(chained.to_dense(), expected) < 1e-5


def test_ten_rounds_in_general_position_switch_to_dense_and_stay_exact():
    d_out, d_in = 60, 50
    chained, expected, ranks = None, torch.zeros(d_out, d_in, dtype=F64), []
    for rnd in range(10):
        res = aggregate_module(make_clients(d_out, d_in, [3, 2], seed=rnd), "fedex-lora").residual
        expected += res.to_dense().to(F64)
        chained = chain_residuals(chained, res)
        ranks.append(chained.rank)
    # Each of these residuals is stored at its true rank K - r_min = 3 (one client eliminated);
    # compression keeps exactly the real directions, until 30 x (60 + 50) numbers exceed a dense 60 x 50.
    assert ranks == [3, 6, 9, 12, 15, 18, 21, 24, 27, 50]
    assert chained.dense is not None
    assert rel(chained.to_dense(), expected) < 1e-5


def test_chain_mixes_dense_and_factored():
    dense = Residual(dense=rand(20, 10).float())
    fact = Residual(left=rand(20, 2, seed=1).float(), right=rand(2, 10, seed=2).float())
    out = chain_residuals(dense, fact)
    assert out.dense is not None
    assert rel(out.to_dense(), dense.to_dense().double() + fact.to_dense().double()) < 1e-6


@pytest.mark.parametrize(("d_out", "d_in", "k"), [(50, 40, 12), (8, 50, 20)])  # Gram path, dense path
def test_top_returns_the_leading_directions_only(d_out, d_in, k):
    left, right, mid = rand(d_out, k), rand(k, d_in, seed=1), rand(k, seed=2).abs() + 0.1
    u_all, v_all = factored_svd(left, right, mid)
    u, v = factored_svd(left, right, mid, top=3)
    assert u.shape == (d_out, 3) and v.shape == (3, d_in)
    assert torch.allclose(u, u_all[:, :3], atol=1e-9) and torch.allclose(v, v_all[:3], atol=1e-9)
    # fewer kept directions than asked for: all of them, no padding
    assert factored_svd(left[:, :2], right[:2], top=5)[0].shape[1] == 2


@pytest.mark.parametrize(("d_out", "d_in", "k"), [(60, 50, 12), (50, 60, 12), (200, 30, 20), (10, 40, 16)])
def test_split_svd_is_exact_with_the_discarded_directions(d_out, d_in, k):
    """Both orientations, and K > min(d_out, d_in) (the dense path)."""
    b_rows, a_rows, mid = rand(k, d_out), rand(k, d_in, seed=1), rand(k, seed=2).abs() + 0.1
    m = (b_rows.mT * mid) @ a_rows
    split = split_svd(b_rows, a_rows, mid, 4)
    assert split.B.shape == (d_out, 4) and split.A.shape == (4, d_in)
    assert split.left.shape[1] == min(k, d_out, d_in) - 4
    assert rel(split.B @ split.A + split.left @ split.right, m) < 1e-12
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    assert rel(split.B @ split.A, (u[:, :4] * s[:4]) @ vh[:4]) < 1e-9
    assert split_svd(b_rows, a_rows, mid, 4, residual=False).left is None


def test_split_svd_stays_exact_for_nearly_identical_clients():
    """Clients one round apart from the same global adapter: badly conditioned factor sets."""
    base_b, base_a = rand(6, 90), rand(6, 70, seed=1)
    b_rows = torch.cat([base_b + 1e-7 * rand(6, 90, seed=10 + i) for i in range(5)])
    a_rows = torch.cat([base_a + 1e-7 * rand(6, 70, seed=20 + i) for i in range(5)])
    mid = torch.full((30,), 0.2, dtype=F64)
    m = (b_rows.mT * mid) @ a_rows
    for rank in (2, 6, 10):
        split = split_svd(b_rows, a_rows, mid, rank)
        assert rel(split.B @ split.A + split.left @ split.right, m) < 1e-10


def test_split_svd_of_dead_columns_returns_fewer_directions():
    b_rows = torch.cat([rand(4, 40), torch.zeros(4, 40, dtype=F64)])
    a_rows = rand(8, 30, seed=1)
    split = split_svd(b_rows, a_rows, torch.ones(8, dtype=F64), 2)
    assert split.left.shape[1] == 4 - 2  # the strategy zero-pads to its layout's 8 - 2
    assert rel(split.B @ split.A + split.left @ split.right, b_rows.mT @ a_rows) < 1e-12
    empty = split_svd(torch.zeros(3, 40, dtype=F64), a_rows[:3], torch.ones(3, dtype=F64), 2)
    assert empty.B.shape == (40, 0) and empty.left.shape == (40, 0)
