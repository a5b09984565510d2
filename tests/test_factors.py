"""Residual: representation choice, validation, products and folding into Linear / Conv1D weights."""

from __future__ import annotations

import pytest
import torch

from chorus_mq.aggregation import Residual
from chorus_mq.errors import AggregationError

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
