"""Robust screening on factored updates, against dense float64 oracles and planted attackers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation import robust
from chorus_mq.aggregation.robust import (
    GramAccumulator,
    RobustPolicy,
    clip_update,
    distances_to,
    geometric_median,
    gram_matrix,
    pairwise_distances,
    robust_z,
    screen,
    update_distance,
)
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.factors import update_norm

F64 = torch.float64


def dense(u) -> torch.Tensor:
    A, B, s = u
    return s * B.to(F64) @ A.to(F64)


def federation(n, *, n_modules=3, d_out=24, d_in=20, r=4, spread=0.3, seed=0):
    """Honest clients: a shared update plus independent perturbations of both factors."""
    g = torch.Generator().manual_seed(seed)
    base = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for _ in range(n_modules)]

    def jitter(t):
        return t + spread * torch.randn(t.shape, generator=g)

    return [[(jitter(A), jitter(B), 2.0) for A, B in base] for _ in range(n)]


def aggregate(clients, res) -> list[torch.Tensor]:
    """Dense per-module sum_i w_i c_im U_im, applying clip factors through clip_update."""
    return [
        sum(res.weights[i].item() * dense(clip_update(c[m], res.clip_factors[i, m].item()))
            for i, c in enumerate(clients) if res.weights[i] > 0)
        for m in range(len(clients[0]))
    ]  # fmt: skip


def honest_mean(clients, attackers) -> list[torch.Tensor]:
    honest = [c for i, c in enumerate(clients) if i not in attackers]
    return [sum(dense(c[m]) for c in honest) / len(honest) for m in range(len(clients[0]))]


def rel_err(got, want) -> float:
    num = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(got, want, strict=False)))
    return num / math.sqrt(sum((b**2).sum().item() for b in want))


# --- Gram-based geometry -------------------------------------------------------------


def test_gram_matches_dense_mixed_ranks_and_dtypes(monkeypatch):
    g = torch.Generator().manual_seed(1)
    kinds = [(2, torch.float32, 0.5), (5, torch.bfloat16, 2.0), (1, F64, 1.0), (3, torch.float16, 4.0)]
    ups = [(torch.randn(r, 30, generator=g).to(dt), torch.randn(17, r, generator=g).to(dt), s) for r, dt, s in kinds]
    D = torch.stack([dense(u).flatten() for u in ups])
    want = D @ D.T
    assert torch.allclose(gram_matrix(ups), want, rtol=1e-10, atol=1e-9)
    monkeypatch.setattr(robust, "_CHUNK_RANK", 4)  # force several client chunks
    assert torch.allclose(gram_matrix(ups), want, rtol=1e-10, atol=1e-9)
    assert torch.allclose(pairwise_distances(want), torch.cdist(D, D), atol=1e-9)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    assert torch.allclose(distances_to(want, alpha), (D - alpha @ D).norm(dim=1), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), d_out=st.integers(1, 12), d_in=st.integers(1, 12),
       s1=st.floats(0.1, 8), s2=st.floats(0.1, 8), seed=st.integers(0, 2**16))  # fmt: skip
def test_norm_and_distance_match_dense(r1, r2, d_out, d_in, s1, s2, seed):
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(r1, d_in, generator=g), torch.randn(d_out, r1, generator=g), s1)
    v = (torch.randn(r2, d_in, generator=g), torch.randn(d_out, r2, generator=g), s2)
    assert update_norm(*u) == pytest.approx(dense(u).norm().item(), rel=1e-9)
    assert update_distance(u, v) == pytest.approx((dense(u) - dense(v)).norm().item(), rel=1e-7, abs=1e-9)


def test_geometric_median_minimises_weighted_distance_sum():
    g = torch.Generator().manual_seed(3)
    ups = [(torch.randn(3, 9, generator=g), torch.randn(7, 3, generator=g), 1.0) for _ in range(6)]
    D = torch.stack([dense(u).flatten() for u in ups])
    w = torch.tensor([1, 2, 1, 3, 1, 1], dtype=F64)
    alpha = geometric_median(gram_matrix(ups), w, max_iter=2000)
    assert alpha.min() >= 0 and alpha.sum().item() == pytest.approx(1.0)

    def cost(z):
        return (w * (D - z).norm(dim=1)).sum().item()

    best = cost(alpha @ D)
    for _ in range(50):  # no nearby point does better
        assert cost(alpha @ D + 1e-3 * torch.randn(D.shape[1], generator=g, dtype=F64)) >= best - 1e-9


def test_geometric_median_sits_on_a_majority_point():
    """Vardi-Zhang step: identical majority clients are the median; Weiszfeld must not divide by zero."""
    clients = federation(5, n_modules=1)
    ups = [clients[0][0]] * 3 + [clients[1][0], clients[2][0]]
    alpha = geometric_median(gram_matrix(ups), torch.ones(5, dtype=F64))
    assert alpha[:3].sum().item() == pytest.approx(1.0)


# --- robust z ------------------------------------------------------------------------


def test_robust_z_fires_at_n5_where_classic_z_cannot():
    x = torch.tensor([1.0, 1.02, 0.98, 1.01, 10.0], dtype=F64)
    classic = (x - x.mean()) / x.std()  # sample std: |z| <= (n-1)/sqrt(n)
    n = len(x)
    assert classic.abs().max() <= (n - 1) / math.sqrt(n) + 1e-12 < 3  # the old tool's ceiling
    z = robust_z(x)
    assert z[4] > 3.5 and z[:4].abs().max() < 3.5


def test_robust_z_mad_zero():
    x = torch.tensor([2.0, 2.0, 2.0, 2.0, 3.0], dtype=F64)
    assert robust_z(x).tolist() == [0, 0, 0, 0, math.inf]
    z = robust_z(x, min_spread=0.01)
    assert math.isfinite(z[4]) and z[4] > 3.5
    assert robust_z(torch.ones(4, dtype=F64)).tolist() == [0, 0, 0, 0]


# --- planted attackers -----------------------------------------------------------------


def _scaled(k):
    return lambda c, g: [(A, B * k, s) for A, B, s in c]


def _sign_flip(c, g):
    return [(A, -B, s) for A, B, s in c]


def _random(c, g):
    out = []
    for A, B, s in c:  # same norm as the honest update, unrelated direction
        A2, B2 = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
        out.append((A2, B2 * update_norm(A, B, s) / update_norm(A2, B2, s), s))
    return out


def _nan(c, g):
    (A, B, s), *rest = c
    A = A.clone()
    A[0, 0] = math.nan
    return [(A, B, s), *rest]


def _inf(c, g):
    *rest, (A, B, s) = c
    B = B.clone()
    B[-1, 0] = math.inf
    return [*rest, (A, B, s)]


def _zero(c, g):
    return [(A, torch.zeros_like(B), s) for A, B, s in c]


ATTACKS = {"x10": _scaled(10), "x100": _scaled(100), "sign_flip": _sign_flip, "random": _random,
           "nan": _nan, "inf": _inf, "zero": _zero}  # fmt: skip


@pytest.mark.parametrize("n", [5, 10, 30])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_planted_attacker_is_excluded_and_honest_kept(n, attack):
    clients = federation(n, seed=n)
    g = torch.Generator().manual_seed(99)
    n_att = max(1, n // 10)
    attackers = set(range(1, 1 + n_att))
    for i in attackers:
        clients[i] = ATTACKS[attack](clients[i], g)
    res = screen(clients)
    assert set(res.excluded) == attackers, res.excluded
    assert rel_err(aggregate(clients, res), honest_mean(clients, attackers)) < 1e-9


def test_colluding_minority_is_excluded():
    clients = federation(10, seed=4)
    g = torch.Generator().manual_seed(5)
    forged = _random(clients[0], g)
    for i in (3, 7):  # two identical attackers
        clients[i] = forged
    res = screen(clients)
    assert set(res.excluded) == {3, 7}
    assert rel_err(aggregate(clients, res), honest_mean(clients, {3, 7})) < 1e-9


def test_one_nan_does_not_disable_the_other_defences():
    clients = federation(10, seed=6)
    clients[2] = _nan(clients[2], None)
    clients[5] = _scaled(100)(clients[5], None)
    res = screen(clients)
    assert set(res.excluded) == {2, 5}
    assert "non-finite" in res.excluded[2] and "norm" in res.excluded[5]
    assert math.isnan(res.stats["norm"][2]) and torch.isfinite(res.stats["norm_z"][[0, 1, 3, 4]]).all()


def test_honest_round_keeps_everyone_with_data_weights():
    clients = federation(30, seed=7)
    w = [float(1 + i % 4) for i in range(30)]
    res = screen(clients, weights=w)
    assert res.excluded == {} and res.weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(res.weights, torch.tensor(w, dtype=F64) / sum(w))


# --- clipping ------------------------------------------------------------------------


def test_adapter_clip_is_linear_and_bounds_the_global_norm():
    clients = federation(10, seed=8)
    clients[0] = _scaled(10)(clients[0], None)
    C = 20.0
    res = screen(clients, RobustPolicy(detect_outliers=False, clip_norm=C))
    for i, c in enumerate(clients):
        before = math.sqrt(sum(update_norm(*u) ** 2 for u in c))
        f = res.clip_factors[i]
        assert torch.allclose(f, f[0].expand_as(f))  # one factor for the whole adapter
        after = math.sqrt(sum(update_norm(*clip_update(u, f[m].item())) ** 2 for m, u in enumerate(c)))
        assert after == pytest.approx(min(before, C), rel=1e-6)  # B stays float32
    # clipping both factors would shrink the update quadratically
    (A, B, s), c0 = clients[0][0], res.clip_factors[0, 0].item()
    assert c0 < 1 and update_norm(A * c0, B * c0, s) == pytest.approx(c0**2 * update_norm(A, B, s))


def test_module_clip_bounds_each_module():
    clients = federation(5, seed=9)
    res = screen(clients, RobustPolicy(detect_outliers=False, clip_norm=3.0, clip_scope="module"))
    for i, c in enumerate(clients):
        for m, u in enumerate(c):
            got = update_norm(*clip_update(u, res.clip_factors[i, m].item()))
            assert got <= 3.0 * (1 + 1e-6) and got == pytest.approx(min(update_norm(*u), 3.0), rel=1e-6)


# --- robust aggregates ---------------------------------------------------------------


def test_geomedian_aggregate_resists_a_large_minority_without_detection():
    clients = federation(10, seed=10)
    attackers = {0, 1, 2, 3}
    for i in attackers:
        clients[i] = _scaled(100)(clients[i], None)
    want = honest_mean(clients, attackers)
    mean = screen(clients, RobustPolicy(detect_outliers=False))
    gm = screen(clients, RobustPolicy(detect_outliers=False, aggregate="geomedian"))
    assert rel_err(aggregate(clients, mean), want) > 10
    spread = max(rel_err([dense(u) for u in clients[i]], want) for i in range(4, 10))
    assert rel_err(aggregate(clients, gm), want) < spread
    assert math.isclose(gm.weights.sum().item(), 1.0) and gm.weights.min() >= 0


def test_trimmed_drops_the_farthest():
    clients = federation(10, seed=11)
    clients[4] = _sign_flip(clients[4], None)
    clients[8] = _scaled(10)(clients[8], None)
    res = screen(clients, RobustPolicy(detect_outliers=False, aggregate="trimmed", trim=2))
    assert set(res.excluded) == {4, 8} and all("trimmed" in r for r in res.excluded.values())
    assert rel_err(aggregate(clients, res), honest_mean(clients, {4, 8})) < 1e-9


# --- inputs --------------------------------------------------------------------------


def test_accumulator_excludes_malformed_and_missing_clients():
    clients = federation(5, seed=12)
    named = [{f"m{m}": u for m, u in enumerate(c)} for c in clients]
    A, B, s = named[1]["m0"]
    named[1]["m0"] = (A[:, :-1], B, s)  # wrong d_in
    del named[3]["m2"]
    res = screen(named)
    assert res.modules == ["m0", "m1", "m2"] and set(res.excluded) == {1, 3}
    assert "shape" in res.excluded[1] and "missing" in res.excluded[3]


@pytest.mark.parametrize("policy,pairwise,per_module", [
    (RobustPolicy(detect_outliers=False, clip_norm=1.0), False, 0),
    (RobustPolicy(clip_norm=1.0), True, 0),
    (RobustPolicy(detect_outliers=False, clip_norm=1.0, clip_scope="module", aggregate="geomedian"), True, 3),
])  # fmt: skip
def test_accumulator_keeps_only_what_the_policy_needs(policy, pairwise, per_module):
    clients = federation(4)
    acc = GramAccumulator(4, policy)
    for m, mod in enumerate(zip(*clients, strict=False)):
        acc.add(f"m{m}", list(mod))
    assert acc.pairwise == pairwise and len(acc._grams) == per_module
    assert (acc._gram is not None) == (pairwise and not per_module)
    full = screen(clients, dataclasses.replace(policy, detect_outliers=True, aggregate="mean"))
    assert torch.allclose(acc.screen().clip_factors, full.clip_factors)


@pytest.mark.parametrize("kwargs", [{"z_threshold": 0}, {"clip_norm": -1.0}, {"clip_norm": math.nan},
                                    {"clip_scope": "layer"}, {"aggregate": "median"}, {"trim": 2}])  # fmt: skip
def test_bad_policy(kwargs):
    with pytest.raises(ConfigError):
        RobustPolicy(**kwargs)


def test_bad_inputs():
    clients = federation(3)
    with pytest.raises(ConfigError):
        screen(clients, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ConfigError):
        screen(clients, weights=[1.0, 1.0])
    with pytest.raises(ConfigError):
        GramAccumulator(3).add("m", clients[0][:2])  # wrong count
    with pytest.raises(ConfigError):
        gram_matrix([(torch.ones(2, 3), torch.ones(4, 3), 1.0)])  # factors do not pair
    with pytest.raises(AggregationError):
        screen([_nan(c, None) for c in clients])
    with pytest.raises(AggregationError):
        screen(clients, RobustPolicy(detect_outliers=False, aggregate="trimmed", trim=3))


def test_screen_then_exact_engine_gives_the_honest_clipped_mean():
    """The worker's path: ClientUpdates in, kept clients reweighted and clipped, FedEx-LoRA exact."""
    from chorus_mq.aggregation import ClientUpdate, aggregate_module

    raw = federation(10, seed=13)
    raw[6] = _scaled(100)(raw[6], None)
    clients = [[ClientUpdate(A, B, s, weight=1.0 + i % 3) for A, B, s in c] for i, c in enumerate(raw)]
    res = screen(clients, RobustPolicy(clip_norm=150.0), weights=[c[0].weight for c in clients])
    assert set(res.excluded) == {6} and (res.clip_factors < 1).any()
    honest = [i for i in range(10) if i != 6]
    total = sum(clients[i][0].weight for i in honest)
    for m in range(3):
        reweighted = [dataclasses.replace(clients[i][m], weight=res.weights[i].item()) for i in res.kept]
        ups = [clip_update(u, res.clip_factors[i, m].item()) for i, u in zip(res.kept, reweighted, strict=False)]
        out = aggregate_module(ups, "fedex-lora")
        got = out.scaling * out.B.double() @ out.A.double() + out.residual.to_dense().double()
        want = sum(clients[i][m].weight / total * res.clip_factors[i, m].item() * dense(raw[i][m]) for i in honest)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
