"""Buffered (FedBuff) flushes against a float64 oracle: several versions, each delta relative to its own base."""

from __future__ import annotations

import math
import random

import pytest
import torch
from agg_oracle import F64, make_clients

from chorus_mq.aggregation import ClientUpdate, aggregate_module
from chorus_mq.aggregation.buffered import (
    StalenessRule,
    base_masses,
    clip_into_absent,
    delta_clip_factors,
    delta_norm_sq,
    dp_flush_weights,
    flush_module,
    flush_residual_form,
    flush_trained,
    flush_weights,
    version_coefficients,
)
from chorus_mq.aggregation.dp import dp_release, gaussian_noise_dense
from chorus_mq.aggregation.sandwich import frame
from chorus_mq.aggregation.server_opt import PreviousFactors
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import Factor, StalenessWeight, Strategy
from chorus_mq.strategy import check_buffered, strategy_spec

torch.set_num_threads(1)


def test_staleness_rules_parse_and_weigh() -> None:
    assert StalenessRule.parse("constant").g(7) == 1.0
    poly = StalenessRule.parse("poly:0.5")
    assert poly.kind == StalenessWeight.POLY
    assert poly.g(0) == 1.0 and math.isclose(poly.g(3), 0.5)
    hinge = StalenessRule.parse("hinge:10,4")
    assert hinge.g(4) == 1.0 and math.isclose(hinge.g(6), 1 / 21)
    for text in ("poly", "poly:a", "hinge:1", "constant:1", "linear:1", "poly:-1", "poly:nan"):
        with pytest.raises(ConfigError):
            StalenessRule.parse(text)
    assert StalenessRule.parse(str(hinge)) == hinge and str(StalenessRule.parse("poly:0.5")) == "poly:0.5"
    with pytest.raises(AggregationError):
        poly.g(-1)


def test_flush_weights_are_normalised_and_discounted() -> None:
    rule = StalenessRule.parse("poly:1")
    p = flush_weights([1.0, 2.0, 1.0], [0, 1, 3], rule)
    raw = [1.0, 2.0 / 2, 1.0 / 4]
    assert all(math.isclose(a, b / sum(raw)) for a, b in zip(p, raw, strict=True))
    assert base_masses([5, 4, 5], p) == {4: p[1], 5: p[0] + p[2]}
    with pytest.raises(AggregationError):
        flush_weights([0.0, 0.0], [0, 1], rule)
    with pytest.raises(AggregationError):
        flush_weights([1.0], [0, 1], rule)


def test_only_exact_strategies_are_buffered() -> None:
    for good in ("fedex-lora", Strategy.SVD, Strategy.FFA_LORA, Strategy.FED_SB):
        check_buffered(good)
    reasons = {
        Strategy.FEDAVG: "no residual to absorb",
        Strategy.STACK: "truncation",
        Strategy.ROLORA: "alternates the trained factor every version",
    }
    for bad, why in reasons.items():
        with pytest.raises(ConfigError, match=f"only for --strategy fedex-lora, svd, ffa-lora, fed-sb; .*{why}"):
            check_buffered(bad)


def _form(r) -> str:
    if r.residual is None:
        return "none"
    return "dense" if r.residual.dense is not None else "factored"


def _k(r) -> int:
    return int(r.residual.left.shape[1]) if _form(r) == "factored" else 0


def _product(f: PreviousFactors | None, shape: tuple[int, int]) -> torch.Tensor:
    return torch.zeros(shape, dtype=F64) if f is None else f.scaling * (f.B.to(F64) @ f.A.to(F64))


@pytest.mark.parametrize("strategy", [Strategy.FEDEX_LORA, Strategy.SVD])
@pytest.mark.parametrize(
    ("lr", "rule", "initial"), [(1.0, "constant", True), (0.7, "poly:0.5", False), (1.3, "hinge:2,1", True)]
)
def test_flushes_match_the_oracle(strategy: Strategy, lr: float, rule: str, initial: bool) -> None:
    """Five flushes of 3-5 deltas from random bases up to 3 versions stale: the published model (base
    correction = every version's residual, plus the latest adapter) equals the oracle's to 1e-6."""
    d_out, d_in, staleness = 24, 18, 3
    rng = random.Random(f"{strategy.value}-{lr}-{rule}")  # a str seed: the same cases in every process
    shape = (d_out, d_in)
    staleness_rule = StalenessRule.parse(rule)
    adapters: list[PreviousFactors | None] = []
    if initial:
        (c,) = make_clients(d_out, d_in, [4], seed=99)
        adapters.append(PreviousFactors(c.A, c.B, c.scaling))
    else:
        adapters.append(None)
    corrections = torch.zeros(shape, dtype=F64)  # Σ residuals up to the latest version, as published (fp32)
    oracle = _product(adapters[0], shape)  # the model's LoRA part of version 0, in float64
    for flush in range(1, 6):
        v = len(adapters) - 1
        n = rng.randint(3, 5)
        ups = make_clients(
            d_out,
            d_in,
            [rng.choice([2, 3, 4]) for _ in range(n)],
            seed=100 * flush,
            weights=[rng.uniform(0.5, 3.0) for _ in range(n)],
        )
        bases = [rng.randint(max(0, v - staleness), v) for _ in range(n)]
        taus = [v - b for b in bases]
        # the oracle, written out from the formula
        raw = [u.weight * staleness_rule.g(t) for u, t in zip(ups, taus, strict=True)]
        step = torch.zeros(shape, dtype=F64)
        for u, b, w in zip(ups, bases, raw, strict=True):
            step += w / sum(raw) * (u.scaling * (u.B.to(F64) @ u.A.to(F64)) - _product(adapters[b], shape))
        oracle = oracle + lr * step
        # the system
        p = flush_weights([u.weight for u in ups], taus, staleness_rule)
        weighted = [ClientUpdate(u.A, u.B, u.scaling, pi) for u, pi in zip(ups, p, strict=True)]
        result = aggregate_module(weighted, strategy)
        coeffs = version_coefficients(v, base_masses(bases, p), lr)
        terms = [(adapters[b], c) for b, c in coeffs.items() if adapters[b] is not None]
        form, k = flush_residual_form((d_out, d_in), _form(result), _k(result), result.A.shape[0], lr, terms)
        out = flush_module(result, terms, lr)
        assert _form(out) == form and _k(out) == k
        if out.residual is not None:
            corrections += out.residual.to_dense().to(F64)
        adapters.append(PreviousFactors(out.A, out.B, out.scaling))
        published = corrections + _product(adapters[-1], shape)
        err = float((published - oracle).norm() / oracle.norm())
        assert err <= 1e-6, (flush, err)


def test_one_fresh_delta_at_lr_one_is_the_strategy_itself() -> None:
    """All deltas from the current version, η = 1: the correction cancels to the strategy's own residual."""
    ups = make_clients(16, 12, [2, 3], seed=4)
    (c,) = make_clients(16, 12, [3], seed=5)
    current = PreviousFactors(c.A, c.B, c.scaling)
    result = aggregate_module(ups, Strategy.FEDEX_LORA)
    terms = [(current, c) for c in version_coefficients(7, {7: 1.0}, 1.0).values()]
    assert [c for _, c in terms] == [0.0]
    out = flush_module(result, terms, 1.0)
    assert out.residual is not None and result.residual is not None
    assert torch.equal(out.residual.left, result.residual.left) and torch.equal(
        out.residual.right, result.residual.right
    )


def test_flush_module_refuses_bad_input() -> None:
    ups = make_clients(8, 6, [2], seed=1)
    result = aggregate_module(ups, Strategy.SVD)
    (other,) = make_clients(9, 6, [2], seed=2)
    with pytest.raises(AggregationError, match="learning rate"):
        flush_module(result, [], 0.0)
    with pytest.raises(AggregationError, match="9 x 6"):
        flush_module(result, [(PreviousFactors(other.A, other.B, other.scaling), 1.0)], 1.0)


def _linear_model(f: PreviousFactors) -> torch.Tensor:
    """``s B A`` (ffa-lora) or ``s B R A`` (fed-sb) in float64."""
    return f.product()


@pytest.mark.parametrize("strategy", [Strategy.FFA_LORA, Strategy.FED_SB])
@pytest.mark.parametrize(
    ("lr", "rule", "absent"), [(1.0, "constant", False), (0.7, "poly:0.5", True), (1.3, "hinge:2,1", False)]
)
def test_linear_flushes_move_the_trained_factor_exactly(strategy: Strategy, lr: float, rule: str, absent: bool) -> None:
    """Five flushes of 3-5 deltas of a linear strategy from random bases up to 3 versions stale (each trained
    from its base's factor): the trained factor alone moves, the frozen frame is every version's bit for bit,
    no residual, and ``s X_{v+1} F`` equals the float64 oracle ``x_v + η Σ p_i (s_i X_i F − s_b X_b F)``
    to 1e-6. ``absent``: one more client of each flush did not send the module (its weight counts, its
    update there is zero)."""
    d_out, d_in, r, staleness = 20, 14, 4, 3
    trains = strategy_spec(strategy).trainable(1)
    assert trains is not None
    rng = random.Random(f"{strategy.value} {lr} {rule}")  # a str seed is the same in every process
    g = torch.Generator().manual_seed(7)
    rule_ = StalenessRule.parse(rule)
    b_frame, a_frame = frame(d_out, d_in, r, seed=3, module="m")
    if strategy == Strategy.FED_SB:
        versions = [PreviousFactors(a_frame, b_frame, 2.0, torch.randn(r, r, generator=g))]
    else:
        versions = [PreviousFactors(a_frame, torch.randn(d_out, r, generator=g), 2.0)]

    def trained_from(base: PreviousFactors, scaling: float, weight: float) -> ClientUpdate:
        x = (base.R if trains == Factor.LORA_R else base.B).clone()  # type: ignore[union-attr]
        x += 0.3 * torch.randn(x.shape, generator=g)
        if trains == Factor.LORA_R:
            return ClientUpdate(base.A, base.B, scaling, weight, R=x)
        return ClientUpdate(base.A, x, scaling, weight)

    oracle = _linear_model(versions[0])
    mixed = 0
    for flush in range(1, 6):
        v = len(versions) - 1
        n = rng.randint(3, 5)
        bases = [rng.randint(max(0, v - staleness), v) for _ in range(n)]
        mixed += len(set(bases)) > 1
        weights = [rng.uniform(0.5, 3.0) for _ in range(n)]
        scalings = [rng.choice([2.0, 1.5]) for _ in range(n)]  # clients' own alphas: s_i / s weighs them
        ups = [trained_from(versions[b], s, w) for b, s, w in zip(bases, scalings, weights, strict=True)]
        taus = [v - b for b in bases] + ([0] if absent else [])
        p = flush_weights(weights + ([1.0] if absent else []), taus, rule_)
        held = p[:n]
        # the oracle, from the formula: each delta against its own base version's model
        step = torch.zeros(d_out, d_in, dtype=F64)
        for u, b, pi in zip(ups, bases, held, strict=True):
            mine = PreviousFactors(u.A, u.B, u.scaling, u.R)
            step += pi * (_linear_model(mine) - _linear_model(versions[b]))
        oracle = oracle + lr * step
        # the system
        weighted = [ClientUpdate(u.A, u.B, u.scaling, pi, R=u.R) for u, pi in zip(ups, held, strict=True)]
        result = aggregate_module(weighted, strategy, absent_weight=sum(p[n:]), trains=trains)
        coeffs = version_coefficients(v, base_masses(bases, held), lr)
        out = flush_trained(result, [(versions[b], c) for b, c in coeffs.items()], lr, trains)
        assert out.residual is None
        assert torch.equal(out.A, a_frame) and (trains == Factor.LORA_B or torch.equal(out.B, b_frame))
        versions.append(PreviousFactors(out.A, out.B, out.scaling, out.R))
        err = float((_linear_model(versions[-1]) - oracle).norm() / oracle.norm())
        assert err <= 1e-6, (flush, err)
    assert mixed >= 2  # flushes whose deltas trained from different versions (rng-fixed)


def test_all_fresh_at_lr_one_is_the_linear_strategy_itself() -> None:
    """Every delta from the current version and η = 1: the trained factor is the strategy's own average."""
    b_frame, a_frame = frame(9, 7, 3, seed=1, module="m")
    g = torch.Generator().manual_seed(2)
    ups = [ClientUpdate(a_frame, b_frame, 1.0, w, R=torch.randn(3, 3, generator=g)) for w in (0.25, 0.75)]
    current = PreviousFactors(a_frame, b_frame, 1.0, torch.randn(3, 3, generator=g))
    result = aggregate_module(ups, Strategy.FED_SB)
    terms = [(current, c) for c in version_coefficients(4, {4: 1.0}, 1.0).values()]
    out = flush_trained(result, terms, 1.0, Factor.LORA_R)
    assert result.R is not None and out.R is not None and torch.equal(out.R, result.R)


def test_flush_trained_refuses_a_version_whose_frozen_factor_differs() -> None:
    _, a_frame = frame(9, 7, 3, seed=1, module="m")
    g = torch.Generator().manual_seed(3)
    result = aggregate_module(
        [ClientUpdate(a_frame, torch.randn(9, 3, generator=g), 1.0, 1.0)], "ffa-lora", trains="lora_B"
    )
    moved = a_frame.clone()
    moved[0, 0] = torch.nextafter(moved[0, 0], torch.tensor(1e9))  # one ulp
    old = PreviousFactors(moved, torch.randn(9, 3, generator=g), 1.0)
    with pytest.raises(AggregationError, match="base version's lora_A differs from the flush's"):
        flush_trained(result, [(old, -0.5)], 1.0, Factor.LORA_B)
    with pytest.raises(AggregationError, match="learning rate"):
        flush_trained(result, [], 0.0, Factor.LORA_B)
    assert flush_trained(result, [(old, 0.0)], 1.0, Factor.LORA_B).B.equal(result.B)  # a zero term is no term


def test_delta_norms_match_the_dense_difference() -> None:
    ups = make_clients(14, 10, [2, 3, 4], seed=11)
    base = PreviousFactors(ups[2].A, ups[2].B, ups[2].scaling)
    for u in ups:
        mine = PreviousFactors(u.A, u.B, u.scaling)
        want = float((_product(mine, (14, 10)) - _product(base, (14, 10))).norm() ** 2)
        assert math.isclose(delta_norm_sq(mine, base), want, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(delta_norm_sq(mine, None), float(_product(mine, (14, 10)).norm() ** 2), rel_tol=1e-9)
    assert delta_norm_sq(base, base) < 1e-9  # a delta equal to its base moved nothing
    (wide,) = make_clients(14, 11, [2], seed=12)
    with pytest.raises(AggregationError, match="14 x 10 against a base version's 14 x 11"):
        delta_norm_sq(PreviousFactors(ups[0].A, ups[0].B, ups[0].scaling), PreviousFactors(wide.A, wide.B, 1.0))


@pytest.mark.parametrize("strategy", [Strategy.FEDEX_LORA, Strategy.SVD])
@pytest.mark.parametrize(("clip_norm", "relative", "lr"), [(3.0, 0.0, 1.0), (0.0, 2.0, 0.8), (5.0, 1.5, 1.2)])
def test_norm_bounded_flushes_clip_each_delta_against_its_own_base(
    strategy: Strategy, clip_norm: float, relative: float, lr: float
) -> None:
    """Four flushes, one delta per flush blown up 50x and one weight absent (a delta without the module): the
    published model equals ``v + η Σ p_i c_i Δ_i`` to 1e-6, ``c_i`` the clip of ``Δ_i`` against its own base."""
    d_out, d_in, shape = 20, 16, (20, 16)
    rng = random.Random(f"clip-{strategy.value}-{clip_norm}-{relative}-{lr}")
    (c0,) = make_clients(d_out, d_in, [3], seed=7)
    adapters: list[PreviousFactors | None] = [PreviousFactors(c0.A, c0.B, c0.scaling)]
    corrections = torch.zeros(shape, dtype=F64)
    oracle = _product(adapters[0], shape)
    clipped_any = 0
    for flush in range(1, 5):
        v = len(adapters) - 1
        n = rng.randint(3, 5)
        ups = make_clients(d_out, d_in, [rng.choice([2, 3]) for _ in range(n)], seed=300 + flush)
        big = rng.randrange(n)
        ups[big] = ClientUpdate(ups[big].A, ups[big].B * 50.0, ups[big].scaling, ups[big].weight)
        bases = [rng.randint(max(0, v - 2), v) for _ in range(n)]
        taus = [v - b for b in bases]
        p = list(flush_weights([u.weight for u in ups] + [2.0], [*taus, 0], StalenessRule.parse("poly:0.5")))
        absent = p.pop()  # a last delta that did not send this module: its update is zero here
        mine = [PreviousFactors(u.A, u.B, u.scaling) for u in ups]
        norms = torch.tensor([[delta_norm_sq(f, adapters[b]) ** 0.5 for f, b in zip(mine, bases, strict=True)]])
        c = [float(x) for x in delta_clip_factors(norms, clip_norm, relative)[0]]
        assert c[big] < 1.0 and all(0.0 < x <= 1.0 for x in c)
        clipped_any += sum(x < 1.0 for x in c)
        # the oracle, in float64: each delta's update against its own base, clipped, weighed by p (not renormalised)
        step = torch.zeros(shape, dtype=F64)
        for f, b, pi, ci in zip(mine, bases, p, c, strict=True):
            update = _product(f, shape) - _product(adapters[b], shape)
            bound = min(1.0, clip_norm / float(update.norm())) if clip_norm else 1.0
            assert ci <= bound * (1 + 1e-6)  # the norm bound on the dense difference, at least
            if not relative:
                assert math.isclose(ci, bound, rel_tol=1e-6)  # and exactly it
            step += pi * ci * update
        oracle = oracle + lr * step
        # the system: clip factors in the weights, the clipped-away mass absent (workers/flush.holder_weights)
        w, strategy_absent = clip_into_absent(p, c, absent)
        assert math.isclose(sum(w) + strategy_absent, sum(p) + absent, rel_tol=1e-12)
        weighted = [ClientUpdate(u.A, u.B, u.scaling, wi) for u, wi in zip(ups, w, strict=True)]
        result = aggregate_module(weighted, strategy, absent_weight=strategy_absent)
        total = sum(w) + strategy_absent
        coeffs = version_coefficients(v, base_masses(bases, [wi / total for wi in w]), lr)
        terms = [(adapters[b], k) for b, k in coeffs.items() if adapters[b] is not None]
        out = flush_module(result, terms, lr)
        if out.residual is not None:
            corrections += out.residual.to_dense().to(F64)
        adapters.append(PreviousFactors(out.A, out.B, out.scaling))
        err = float((corrections + _product(adapters[-1], shape) - oracle).norm() / oracle.norm())
        assert err <= 1e-6, (flush, err)
    assert clipped_any >= 4


def test_delta_clip_factors_are_the_sync_bounds_on_each_delta() -> None:
    norms = torch.tensor([[3.0, 4.0, float("nan")], [4.0, 3.0, 1.0]], dtype=F64)  # (modules, deltas)
    whole = [5.0, 5.0, 1.0]
    got = delta_clip_factors(norms, 2.5, 0.0)
    assert torch.allclose(got, torch.tensor([[min(1.0, 2.5 / x) for x in whole]] * 2, dtype=F64))
    assert torch.equal(delta_clip_factors(norms, 0.0, 0.0), torch.ones_like(norms))
    from chorus_mq.aggregation.robust import relative_clip_factors

    assert torch.equal(delta_clip_factors(norms, 0.0, 1.0), relative_clip_factors(norms, 1.0))
    with pytest.raises(AggregationError, match="clip norm"):
        delta_clip_factors(norms, -1.0, 0.0)
    with pytest.raises(AggregationError, match="clip factors must lie in"):
        clip_into_absent([0.5], [1.5], 0.0)
    w, absent = clip_into_absent([0.5, 0.25], [0.5, 1.0], 0.25)
    assert w == [0.25, 0.25] and absent == 0.5


def test_dp_flush_weights_are_fixed_and_a_clients_deltas_share_one_slot() -> None:
    rule = StalenessRule.parse("poly:1")
    q = dp_flush_weights([0, 1, 3], [2, 2, 1], rule, 4)
    assert q == (1 / 8, 0.5 / 8, 0.25 / 4)
    with pytest.raises(AggregationError, match="quorum"):
        dp_flush_weights([0], [1], rule, 0)
    with pytest.raises(AggregationError, match="term counts"):
        dp_flush_weights([0], [0], rule, 2)


def test_a_dp_flush_is_the_clipped_update_plus_the_documented_noise() -> None:
    """Three deltas from versions 0 and 1 (one client twice): published = x_v + η (Σ q_i c_i Δ_i + Z),
    c_i clipping each Δ_i to C, q_i = g(τ_i) / (K k_i), Z ~ N(0, (z C / K)^2): the unnoised part exact against
    the float64 oracle with Z drawn from the same seeded generator, and Z's scale the formula's."""
    d_out, d_in, K, C, z, lr = 40, 30, 3, 0.5, 0.8, 0.9
    shape = (d_out, d_in)
    rule = StalenessRule.parse("poly:0.5")
    v0, v1 = (PreviousFactors(c.A, c.B, c.scaling) for c in make_clients(d_out, d_in, [4, 4], seed=20))
    versions = {0: v0, 1: v1}
    ups = make_clients(d_out, d_in, [2, 3, 4], seed=21)
    bases, owners = [1, 0, 1], ["a", "a", "b"]
    taus = [1 - b for b in bases]
    q = dp_flush_weights(taus, [owners.count(o) for o in owners], rule, K)
    factors = [PreviousFactors(u.A, u.B, u.scaling) for u in ups]
    norms = [math.sqrt(delta_norm_sq(f, versions[b])) for f, b in zip(factors, bases, strict=True)]
    clip = [min(1.0, C / n) for n in norms]
    assert min(clip) < 1.0  # at least one delta is clipped (seed-fixed)
    w = [qi * ci for qi, ci in zip(q, clip, strict=True)]
    scaled = [ClientUpdate(u.A, u.B, u.scaling * K * wi, 1.0) for u, wi in zip(ups, w, strict=True)]
    released = dp_release(
        scaled, quorum=K, clip_norm=C, noise_multiplier=z, generator=torch.Generator().manual_seed(5), frozen_a=False
    )
    coeffs = version_coefficients(1, base_masses(bases, w), lr)
    out = flush_module(released, [(versions[b], c) for b, c in coeffs.items()], lr)
    published = _product(PreviousFactors(out.A, out.B, out.scaling), shape) + out.residual.to_dense().to(F64)
    noise = gaussian_noise_dense(d_out, d_in, z * C / K, torch.Generator().manual_seed(5)).to(F64)
    clipped = sum(
        wi * (_product(f, shape) - _product(versions[b], shape)) for wi, f, b in zip(w, factors, bases, strict=True)
    )
    oracle = _product(v1, shape) + lr * (clipped + noise)
    assert float((published - oracle).norm() / oracle.norm()) <= 1e-6
    sigma = float(((published - _product(v1, shape) - lr * clipped) / lr).std())
    assert abs(sigma / (z * C / K) - 1.0) < 0.1  # 1200 draws: the std's sd is about 2%
