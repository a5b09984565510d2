"""Residual (representation, validation, products, folding into Linear / Conv1D weights), update norms, factor_dense."""

from __future__ import annotations

import math

import pytest
import torch

from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual, factor_dense, update_norm

F64 = torch.float64


def factors(d_out, d_in, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, k, generator=gen), torch.randn(k, d_in, generator=gen)


def test_from_factors_keeps_factors_when_smaller():
    left, right = factors(40, 30, 5)
    res = Residual.from_factors(left, right)
    assert res.dense is None and res.rank == 5 and res.shape == (40, 30)
    assert res.nbytes == (40 * 5 + 5 * 30) * 4


def test_from_factors_goes_dense_when_smaller_and_stays_exact():
    left, right = factors(12, 10, 8)  # 8 * 22 > 120
    res = Residual.from_factors(left.double(), right.double())
    assert res.left is None and res.dense.dtype == torch.float32 and res.shape == (12, 10)
    expected = left.double() @ right.double()
    assert torch.allclose(res.dense.double(), expected, rtol=1e-6, atol=1e-6)
    assert res.nbytes == 12 * 10 * 4 and res.rank == 10


def test_from_factors_of_rank_zero_is_none():
    assert Residual.from_factors(torch.zeros(4, 0), torch.zeros(0, 3)) is None


def test_other_dtypes_are_stored_as_float32():
    left, right = factors(6, 5, 2)
    res = Residual(left=left.bfloat16(), right=right.double())
    assert res.left.dtype == res.right.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"left": torch.zeros(3, 2)},
        {"left": torch.zeros(3, 2), "right": torch.zeros(3, 4)},
        {"left": torch.zeros(3, 2), "right": torch.zeros(2, 4), "dense": torch.zeros(3, 4)},
        {"dense": torch.zeros(3, 4, 1)},
        {"dense": torch.zeros(3, 4, dtype=torch.int64)},
    ],
)
def test_malformed_residuals_are_rejected(kwargs):
    with pytest.raises(AggregationError):
        Residual(**kwargs)


def test_products_agree_with_the_dense_matrix():
    left, right = factors(9, 7, 3)
    res = Residual(left=left, right=right)
    dense = res.to_dense()
    x = torch.randn(7, 4)
    assert torch.allclose(res.matmul_right(x), dense @ x, atol=1e-5)
    assert torch.allclose(Residual(dense=dense).matmul_right(x), dense @ x, atol=1e-5)


def test_fold_into_linear_adds_the_residual_as_is():
    left, right = factors(6, 4, 2)
    res = Residual(left=left, right=right)
    linear = torch.nn.Linear(4, 6, bias=False)  # weight (d_out, d_in)
    folded = res.fold_into(linear.weight.detach())
    assert torch.allclose(folded, linear.weight + res.to_dense(), atol=1e-6)
    with pytest.raises(AggregationError):
        res.fold_into(linear.weight.detach(), fan_in_fan_out=True)


def test_fold_into_conv1d_adds_the_transpose():
    """GPT-2 Conv1D stores (d_in, d_out) and computes x @ W, so dW in B@A layout enters as dW.T."""
    left, right = factors(6, 4, 2)
    res = Residual(left=left, right=right)
    weight = torch.randn(4, 6)  # Conv1D(nf=6, nx=4).weight
    folded = res.fold_into(weight, fan_in_fan_out=True)
    x = torch.randn(3, 4)
    # Folding must act on inputs exactly like a Linear layer with weight residual (d_out, d_in).
    assert torch.allclose(x @ folded, x @ weight + x @ res.to_dense().T, atol=1e-5)
    with pytest.raises(AggregationError):
        res.fold_into(weight)


def test_fold_into_keeps_the_weight_dtype():
    left, right = factors(6, 4, 2)
    res = Residual(left=left, right=right)
    assert res.fold_into(torch.zeros(6, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert res.fold_into(torch.zeros(6, 4, dtype=F64)).dtype == F64


def test_form_and_factors_accessor():
    left, right = factors(8, 6, 2)
    fact, dense = Residual(left=left, right=right), Residual(dense=torch.zeros(8, 6))
    assert fact.form == "factored" and dense.form == "dense"
    assert fact.factors()[0] is fact.left
    with pytest.raises(AggregationError, match="dense"):
        dense.factors()


def test_a_transposed_float64_factor_becomes_a_contiguous_float32_copy():
    rows = torch.randn(3, 40, dtype=F64)
    res = Residual(left=rows.mT, right=torch.randn(3, 5, dtype=F64))
    assert res.left.is_contiguous() and res.left.dtype == torch.float32
    assert torch.equal(res.left, rows.mT.float())


@pytest.mark.parametrize(("d_out", "d_in", "r", "scaling"), [(30, 20, 4, 2.0), (7, 50, 1, 0.25), (16, 16, 16, 1.0)])
def test_update_norm_is_the_frobenius_norm_of_the_product(d_out, d_in, r, scaling):
    gen = torch.Generator().manual_seed(d_out)
    A, B = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
    dense = scaling * (B.double() @ A.double())
    assert update_norm(A, B, scaling) == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)
    assert update_norm(A.bfloat16(), B.bfloat16()) == pytest.approx(
        float(torch.linalg.norm(B.bfloat16().double() @ A.bfloat16().double())), rel=1e-12
    )


def test_update_norm_of_a_zero_update_is_zero():
    assert update_norm(torch.zeros(3, 5), torch.randn(4, 3), 2.0) == 0.0


@pytest.mark.parametrize(
    ("A", "B", "scaling"),
    [
        (torch.full((2, 3), 1e160, dtype=F64), torch.full((4, 2), 1e160, dtype=F64), 1.0),  # the Grams overflow
        (torch.full((2, 3), 1e30), torch.full((4, 2), 1e30), 1e300),  # finite factors, infinite update
        (torch.tensor([[math.nan, 1.0]]), torch.ones(3, 1), 1.0),
        (torch.tensor([[math.inf, 1.0]]), torch.ones(3, 1), 1.0),
    ],
)
def test_update_norm_overflow_is_inf(A, B, scaling):
    assert update_norm(A, B, scaling) == math.inf


def test_factor_dense_is_exact_and_keeps_only_the_real_rank():
    left, right = factors(30, 20, 3)
    dense = (left.double() @ right.double()).float()
    got_l, got_r = factor_dense(dense)
    assert got_l.shape == (30, 3) and got_r.shape == (3, 20)
    assert torch.allclose(got_l.double() @ got_r.double(), dense.double(), rtol=0, atol=1e-5)
    assert factor_dense(torch.zeros(5, 4))[0].shape == (5, 0)
