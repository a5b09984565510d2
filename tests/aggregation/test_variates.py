"""SCAFFOLD's variate math (chorus_mq.aggregation.variates) against a float64 oracle written out here."""

from __future__ import annotations

import math

import pytest
import torch

from chorus_mq.aggregation.variates import (
    MIN_LR_SUM,
    client_variate,
    clip_factors,
    gauge_rotation,
    next_variate,
    transport,
    variate_delta,
)
from chorus_mq.errors import AggregationError

torch.set_num_threads(1)
F64 = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _oracle(server, start, trained, lr_sums, weights, fraction, k):
    """c + f Σ w_i κ_i ((x - y_i)/lr_i - c), κ_i = min(1, k · lower-median / ‖Δc_i‖), all by hand in float64."""
    deltas = [
        [(x - y) / lr - c for x, y, c in zip(start, ys, server, strict=True)]
        for ys, lr in zip(trained, lr_sums, strict=True)
    ]
    norms = [math.sqrt(sum(float((d * d).sum()) for d in ds)) for ds in deltas]
    med = sorted(norms)[(len(norms) - 1) // 2]
    kappas = [1.0 if n <= k * med else k * med / n for n in norms]
    out = [c.clone() for c in server]
    for ds, w, kappa in zip(deltas, weights, kappas, strict=True):
        for j, d in enumerate(ds):
            out[j] = out[j] + fraction * w * kappa * d
    return out, kappas


def test_the_server_step_is_the_weighted_clipped_mean_of_option_ii_updates():
    start = [_rand(4, 12, seed=0).float(), _rand(16, 4, seed=1).float()]
    server = [_rand(4, 12, seed=2).float() * 0.1, _rand(16, 4, seed=3).float() * 0.1]
    trained = [[x + 0.01 * _rand(*x.shape, seed=10 * i + j).float() for j, x in enumerate(start)] for i in range(4)]
    # client 3 declares a tiny lr_sum: its Δc is ~1e4 times the others' and must be clipped to k x the median
    lr_sums, weights = [0.05, 0.1, 0.2, 1e-6], [0.1, 0.2, 0.3, 0.4]
    got, factors = next_variate(server, start, trained, lr_sums, weights, fraction=0.5, k=10.0)
    want, kappas = _oracle(
        [c.double() for c in server],
        [x.double() for x in start],
        [[y.double() for y in ys] for ys in trained],
        lr_sums,
        weights,
        0.5,
        10.0,
    )
    assert factors == pytest.approx(kappas, rel=1e-12)
    assert factors[:3] == [1.0, 1.0, 1.0] and factors[3] < 1e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == F64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_no_server_variate_is_a_zero_one_and_a_client_adds_its_own_delta():
    x, y = _rand(3, 5, seed=0), _rand(3, 5, seed=1)
    torch.testing.assert_close(variate_delta(x, y, None, 0.5), (x - y) / 0.5)
    got, factors = next_variate(None, [x], [[y]], [0.5], [1.0], fraction=1.0, k=10.0)
    torch.testing.assert_close(got[0], (x - y) / 0.5)
    assert factors == [1.0]
    own, server = _rand(3, 5, seed=2), _rand(3, 5, seed=3)
    # c_i + Δc_i = c_i - c + (x - y)/lr
    torch.testing.assert_close(client_variate(own, server, x, y, 0.5), own - server + (x - y) / 0.5)


def test_the_relative_clip_uses_the_lower_median():
    assert clip_factors([1.0, 1.0, 100.0], 10.0) == [1.0, 1.0, 0.1]
    assert clip_factors([1.0, 50.0], 10.0) == [1.0, 0.2]  # two clients: the smaller one sets the scale
    assert clip_factors([0.0, 0.0, 3.0], 10.0) == [1.0, 1.0, 0.0]  # zero median: nobody adds anything
    assert clip_factors([], 10.0) == []
    with pytest.raises(AggregationError):
        clip_factors([1.0, math.inf], 10.0)


def test_nonsense_lr_sums_and_shapes_are_refused():
    x = torch.zeros(2, 3)
    for bad in (0.0, -1.0, MIN_LR_SUM / 10, math.nan, math.inf):
        with pytest.raises(AggregationError, match="lr_sum"):
            variate_delta(x, x, None, bad)
    with pytest.raises(AggregationError, match="shape"):
        variate_delta(x, torch.zeros(3, 2), None, 1.0)
    with pytest.raises(AggregationError, match="one rank"):
        gauge_rotation(torch.zeros(4, 3), torch.zeros(2, 3))


def test_transport_follows_a_rotated_basis_exactly():
    """The same LoRA product in the basis (B Qᵀ, Q A): the rotation is found and the variate carried with it."""
    a_old, b_old = _rand(4, 12, seed=0), _rand(16, 4, seed=1)
    q, _ = torch.linalg.qr(_rand(4, 4, seed=2))
    a_new, b_new = q @ a_old, b_old @ q.T
    rotation = gauge_rotation(a_new, a_old)
    torch.testing.assert_close(rotation, q, rtol=0, atol=1e-12)
    torch.testing.assert_close(b_new @ a_new, b_old @ a_old)  # same product: only the basis changed
    c_a, c_b = _rand(4, 12, seed=3), _rand(16, 4, seed=4)
    t_a, t_b = transport(c_a, c_b, rotation)
    torch.testing.assert_close(t_a, q @ c_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_b, c_b @ q.T, rtol=0, atol=1e-12)
    # the first-order change of the product a variate step makes is the same in either basis
    torch.testing.assert_close(t_b @ a_new + b_new @ t_a, c_b @ a_old + b_old @ c_a)
    # an unchanged basis is left alone
    torch.testing.assert_close(gauge_rotation(a_old, a_old), torch.eye(4, dtype=F64), rtol=0, atol=1e-12)
