"""Client-level DP: calibration, accounting, noise on factored updates and the released aggregate.

Pinned reference values were computed with Google's dp-accounting 0.6.0
(PLD and RDP accountants), which the project does not depend on.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from chorus_mq.aggregation import ClientUpdate
from chorus_mq.aggregation.dp import (
    DEFAULT_ORDERS,
    PrivacyAccountant,
    aggregate_sensitivity,
    analytic_gaussian_sigma,
    dp_layout,
    dp_release,
    frozen_shared_a,
    gaussian_log_delta,
    gaussian_noise_dense,
    gaussian_rdp,
    gdp_epsilon,
    noise_B,
    noise_for_budget,
    noise_generator,
    orthonormal_rows,
    rdp_to_epsilon,
)
from chorus_mq.errors import AggregationError, ConfigError

EPSILONS = [0.1, 0.5, 1, 2, 8, 16]


def test_sigma_known_value():
    # Balle & Wang 2018; dp-accounting's PLD gives delta = 1.0000e-05 at this sigma
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306316, rel=1e-6)
    assert analytic_gaussian_sigma(1.0, 1e-5, sensitivity=0.25) == pytest.approx(3.7306316 / 4, rel=1e-6)


@pytest.mark.parametrize("eps", EPSILONS)
def test_sigma_is_valid_and_tight_for_any_epsilon(eps):
    delta = 1e-5
    sigma = analytic_gaussian_sigma(eps, delta)
    assert math.exp(gaussian_log_delta(eps, 1 / sigma)) <= delta
    assert math.exp(gaussian_log_delta(eps, 1 / (sigma * (1 - 1e-6)))) > delta  # no slack left
    classic = math.sqrt(2 * math.log(1.25 / delta)) / eps
    if eps < 1:  # the classic formula is valid (and looser) only here
        assert sigma < classic


def test_sigma_decreases_with_epsilon():
    sigmas = [analytic_gaussian_sigma(e, 1e-5) for e in EPSILONS]
    assert all(a > b for a, b in itertools.pairwise(sigmas))


def test_delta_formula_matches_numerical_privacy_loss():
    """delta(eps) = E_{y~N(0,s^2)}[(1 - e^(eps - L(y)))_+], L the privacy loss vs N(1, s^2)."""
    rng = random.Random(7)
    for _ in range(8):  # random eps, and sigma giving a delta somewhere in [1e-10, 1e-2]
        eps = rng.uniform(0.05, 12)
        sigma = analytic_gaussian_sigma(eps, 10 ** rng.uniform(-10, -2)) * rng.uniform(0.9, 1.1)
        cut = 0.5 - sigma**2 * eps  # the loss exceeds eps exactly below this point
        y = torch.linspace(min(cut, 0.0) - 15 * sigma, cut, 400_001, dtype=torch.float64)
        loss = (1 - 2 * y) / (2 * sigma**2)  # log p0(y) - log p1(y)
        pdf = torch.exp(-0.5 * (y / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        numeric = torch.trapezoid(pdf * (1 - torch.exp(eps - loss)).clamp_min(0), y).item()
        assert math.exp(gaussian_log_delta(eps, 1 / sigma)) == pytest.approx(numeric, rel=1e-6)


def direct_rdp_epsilon(z, delta):
    return min(
        a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in DEFAULT_ORDERS
    )


def test_one_round_matches_direct_rdp_and_exact_conversion():
    z = analytic_gaussian_sigma(1.0, 1e-5)
    acc = PrivacyAccountant()
    acc.spend(z)
    assert acc.epsilon_rdp(1e-5) == pytest.approx(direct_rdp_epsilon(z, 1e-5), rel=1e-12)
    assert acc.epsilon_rdp(1e-5) == pytest.approx(1.0926, rel=2e-3)  # dp-accounting RdpAccountant
    assert acc.epsilon(1e-5) == pytest.approx(1.0, rel=1e-6)  # exact: it is one Gaussian mechanism


def test_composition_costs_about_sqrt_rounds():
    z, delta = 20.0, 1e-5
    one = PrivacyAccountant()
    one.spend(z)
    for rounds in (4, 25, 100):
        acc = PrivacyAccountant()
        acc.spend(z, rounds=rounds)
        ratio = acc.epsilon(delta) / one.epsilon(delta)
        assert 0.9 * math.sqrt(rounds) < ratio < 1.5 * math.sqrt(rounds)
        same = PrivacyAccountant()  # R Gaussians compose into one with z / sqrt(R)
        same.spend(z / math.sqrt(rounds))
        assert acc.epsilon(delta) == pytest.approx(same.epsilon(delta), rel=1e-9)


def test_exact_composition_matches_pld():
    acc = PrivacyAccountant()
    for _ in range(5):
        acc.spend(2.0)
    assert acc.epsilon(1e-6) == pytest.approx(5.5508599, rel=1e-6)  # dp-accounting PLD, 5 x z=2
    assert acc.epsilon(1e-6) <= acc.epsilon_rdp(1e-6)


def test_subsampled_rdp_matches_reference():
    got = gaussian_rdp(1.1, [2, 3, 10, 32], sample_rate=0.1).tolist()
    assert got == pytest.approx([0.01276995, 0.02231138, 1.57986699, 10.84627846], rel=1e-6)
    assert math.isinf(gaussian_rdp(1.1, [1.5], sample_rate=0.1)[0])  # fractional orders need q = 1
    acc = PrivacyAccountant()
    acc.spend(1.5152578887859993, rounds=1000, sample_rate=0.01)
    # dp-accounting (finer orders) says 0.99794; ours is a valid, slightly coarser bound
    assert 0.99794 <= acc.epsilon(1e-5) < 1.02
    assert acc.epsilon(1e-5) == acc.epsilon_rdp(1e-5)


def test_json_round_trip_and_continue():
    acc = PrivacyAccountant()
    acc.spend(3.0, rounds=2)
    acc.spend(1.2, sample_rate=0.05)  # leaves inf at fractional orders
    back = PrivacyAccountant.from_json(json.loads(json.dumps(acc.to_json(), allow_nan=False)))
    assert back.epsilon(1e-5) == acc.epsilon(1e-5) and back.rounds == 3 and not back.exact
    back.spend(3.0)
    acc.spend(3.0)
    acc.spend(0.5, rounds=0, sample_rate=0.5)  # a no-op, not nan
    assert back.to_json() == acc.to_json()


@pytest.mark.parametrize("bad", [{}, {"version": 2}, {"version": 1, "orders": [2.0], "rdp": [-1.0], "mu2": 0,
                                                      "exact": True, "rounds": 0},
                                 {"version": 1, "orders": [2.0, 3.0], "rdp": [0.0], "mu2": 0, "exact": True,
                                  "rounds": 0}])  # fmt: skip
def test_json_rejects_malformed(bad):
    with pytest.raises(ConfigError):
        PrivacyAccountant.from_json(bad)


@pytest.mark.parametrize("rounds,q", [(1, 1.0), (10, 1.0), (100, 0.1)])
def test_noise_for_budget(rounds, q):
    z = noise_for_budget(2.0, 1e-5, rounds=rounds, sample_rate=q)
    acc = PrivacyAccountant()
    acc.spend(z, rounds=rounds, sample_rate=q)
    assert 2.0 * (1 - 1e-6) < acc.epsilon(1e-5) <= 2.0
    if rounds == 1:
        assert z == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5), rel=1e-9)


def test_gdp_epsilon_inverts_sigma():
    for eps in EPSILONS:
        assert gdp_epsilon(1 / analytic_gaussian_sigma(eps, 1e-5), 1e-5) == pytest.approx(eps, rel=1e-9)


def test_sensitivity():
    assert aggregate_sensitivity(2.0, [0.1] * 10) == pytest.approx(0.2)
    assert aggregate_sensitivity(2.0, [0.5, 0.25, 0.25]) == pytest.approx(1.0)


def test_dense_noise_std():
    g = torch.Generator().manual_seed(0)
    z = gaussian_noise_dense(256, 256, 0.37, g)
    assert z.shape == (256, 256) and z.dtype == torch.float32
    assert z.std().item() == pytest.approx(0.37, rel=0.02) and abs(z.mean().item()) < 0.01


def test_noise_on_B_with_frozen_orthonormal_A():
    g = torch.Generator().manual_seed(1)
    d_out, d_in, r, s, sigma = 512, 256, 16, 2.0, 0.5
    A = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0].T.float()
    assert orthonormal_rows(A)
    B = torch.randn(d_out, r, generator=g)
    noisy = noise_B(B, A, sigma, s, g)
    weight_noise = s * (noisy - B).double() @ A.double()  # the noise as it lands in weight space
    assert (s * (noisy - B)).std().item() == pytest.approx(sigma, rel=0.05)
    # energy sigma^2 d_out r, not sigma^2 d_out d_in: the mechanism on the row space of A
    assert weight_noise.norm().item() ** 2 == pytest.approx(sigma**2 * d_out * r, rel=0.08)
    with pytest.raises(ConfigError):
        noise_B(B, torch.randn(r, d_in, generator=g), sigma, s, g)


@pytest.mark.parametrize("call", [
    lambda: analytic_gaussian_sigma(0.0, 1e-5), lambda: analytic_gaussian_sigma(1.0, 1.0),
    lambda: analytic_gaussian_sigma(1.0, 1e-5, sensitivity=-1), lambda: gaussian_rdp(0.0, [2]),
    lambda: gaussian_rdp(1.0, [2], sample_rate=1.5), lambda: rdp_to_epsilon([0.1], [2], 0.0),
    lambda: PrivacyAccountant([1.0]), lambda: PrivacyAccountant().spend(1.0, rounds=-1),
    lambda: aggregate_sensitivity(1.0, [math.nan]), lambda: gaussian_noise_dense(2, 2, -1.0),
    lambda: noise_for_budget(0.0, 1e-5),
])  # fmt: skip
def test_bad_parameters(call):
    with pytest.raises(ConfigError):
        call()


def _clients(n, d_out, d_in, r, *, shared_a, seed=0):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0].T.float().contiguous()
    return [
        ClientUpdate(
            A=a0 if shared_a else torch.randn(r, d_in, generator=g) / math.sqrt(d_in),
            B=torch.randn(d_out, r, generator=g) * 0.1,
            scaling=2.0,
            weight=123.0,  # ignored: the mechanism fixes 1 / quorum
        )
        for _ in range(n)
    ]


def _exact(updates, quorum):
    return sum((u.scaling / quorum) * (u.B.double() @ u.A.double()) for u in updates)


def test_dp_release_ffa_noises_b_only_with_the_calibrated_std():
    updates = _clients(4, 600, 300, 8, shared_a=True)
    quorum, clip, z = 5, 2.0, 1.3  # one of five expected clients is absent: a zero update
    res = dp_release(
        updates, quorum=quorum, clip_norm=clip, noise_multiplier=z, generator=torch.Generator().manual_seed(0)
    )
    sigma = z * clip / quorum
    assert res.residual is None and res.scaling == 1.0
    assert torch.equal(res.A, updates[0].A)  # the frozen A is released as is
    b_exact = sum((u.scaling / quorum) * u.B.double() for u in updates)
    noise = res.B.double() - b_exact
    assert float(noise.std()) == pytest.approx(sigma, rel=0.05)
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(noise.numel())  # four standard errors
    layout = dp_layout([8] * 4, 600, 300, frozen_a=True)
    assert layout.adapter_shapes == (tuple(res.A.shape), tuple(res.B.shape)) and layout.residual == "none"


def test_dp_release_dense_noises_the_weight_space_update():
    updates = _clients(3, 200, 150, 4, shared_a=False)
    quorum, clip, z = 3, 1.0, 2.0
    res = dp_release(
        updates, quorum=quorum, clip_norm=clip, noise_multiplier=z, generator=torch.Generator().manual_seed(1)
    )
    released = res.B.double() @ res.A.double() + res.residual.to_dense().double()
    noise = released - _exact(updates, quorum)
    assert float(noise.std()) == pytest.approx(z * clip / quorum, rel=0.03)
    # the adapter is the best rank-4 approximation of the released (noised) matrix
    u, s, vh = torch.linalg.svd(released, full_matrices=False)
    assert float((res.B.double() @ res.A.double() - (u[:, :4] * s[:4]) @ vh[:4]).norm()) < 1e-4 * float(s[0])
    layout = dp_layout([4, 4, 4], 200, 150, frozen_a=False)
    assert res.residual.dense is not None and layout.residual_shapes == ((200, 150),)
    assert layout.adapter_shapes == (tuple(res.A.shape), tuple(res.B.shape))
    padded = dp_release(updates, quorum=quorum, clip_norm=clip, noise_multiplier=z, generator=torch.Generator(),
                        out_rank=6)  # fmt: skip
    assert padded.A.shape == (6, 150)


def test_dp_noise_is_deterministic_per_module_and_secret_keyed():
    updates = _clients(3, 64, 48, 4, shared_a=False)

    def release(key, module):
        gen = noise_generator(key, "fed", 3, module)
        return dp_release(updates, quorum=3, clip_norm=1.0, noise_multiplier=1.0, generator=gen).residual.dense

    assert torch.equal(release("k1", "q_proj"), release("k1", "q_proj"))  # a re-run releases the same noise
    assert not torch.equal(release("k1", "q_proj"), release("k1", "v_proj"))
    assert not torch.equal(release("k1", "q_proj"), release("k2", "q_proj"))


def test_dp_release_detects_or_requires_a_frozen_a():
    shared, free = _clients(3, 64, 48, 4, shared_a=True), _clients(3, 64, 48, 4, shared_a=False)
    assert frozen_shared_a(shared) and not frozen_shared_a(free)
    kwargs = {"quorum": 3, "clip_norm": 1.0, "noise_multiplier": 1.0, "generator": torch.Generator().manual_seed(0)}
    assert dp_release(shared, **kwargs).residual is None
    assert dp_release(shared, frozen_a=False, **kwargs).residual.dense is not None
    with pytest.raises(ConfigError, match="frozen_a"):
        dp_release(free, frozen_a=True, **kwargs)
    with pytest.raises(ConfigError, match="quorum"):
        dp_release(free, **(kwargs | {"quorum": 0}))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        dp_release(free, **(kwargs | {"noise_multiplier": 0.0}))


def test_dp_layout_refuses_what_the_mechanism_cannot_release():
    with pytest.raises(AggregationError, match="one rank"):
        dp_layout([4, 8], 10, 10, frozen_a=True)
    with pytest.raises(AggregationError, match="below"):
        dp_layout([4], 10, 10, frozen_a=True, out_rank=2)
    with pytest.raises(AggregationError, match="ranks"):
        dp_layout([], 10, 10, frozen_a=False)


def test_a_head_is_clipped_jointly_with_the_adapter_and_released_with_the_modules_noise():
    """Float64 oracle: one clip factor over each client's adapter update and head step, the head released as
    ``h_start + Σ c_i / K (h_i − h_start) + N(0, (z C / K)^2)``, the noise regenerated from the same key."""
    from chorus_mq.aggregation.dp import adapter_clip_factor, dp_head_release, head_step

    g = torch.Generator().manual_seed(3)
    start = torch.randn(3, 8, generator=g)
    heads = [start + s * torch.randn(3, 8, generator=g) for s in (0.01, 0.02, 40.0)]  # the last step is huge
    adapter_sq = [0.3, 0.5, 0.2]  # each client's adapter-wide ||U||^2, below C^2 alone
    C, K, z = 1.0, 4, 0.8
    head_sq = [float(((h.double() - start.double()) ** 2).sum()) for h in heads]
    clips = [adapter_clip_factor([a, h], C) for a, h in zip(adapter_sq, head_sq, strict=True)]
    assert clips[:2] == [1.0, 1.0] and clips[2] == pytest.approx(C / math.sqrt(adapter_sq[2] + head_sq[2]))
    assert adapter_clip_factor([adapter_sq[2]], C) == 1.0  # the adapter alone would not have been clipped
    sigma = z * C / K
    out = dp_head_release(
        start, heads, [start] * 3, [c / K for c in clips], sigma=sigma, generator=noise_generator("k", "f", 1, "h")
    )
    noise = gaussian_noise_dense(3, 8, sigma, noise_generator("k", "f", 1, "h"), torch.float64)
    want = start.double() + sum(c / K * (h.double() - start.double()) for c, h in zip(clips, heads, strict=True))
    want = want + noise
    assert out.dtype == torch.float32 and float((out.double() - want).norm() / want.norm()) < 1e-6
    # the clipped contribution (update, head step) has norm C at most; the whole release's sensitivity is C / K
    assert math.sqrt(clips[2] ** 2 * (adapter_sq[2] + head_sq[2])) == pytest.approx(C)
    again = dp_head_release(
        start, heads, [start] * 3, [c / K for c in clips], sigma=sigma, generator=noise_generator("k", "f", 1, "h")
    )
    assert torch.equal(again, out)  # a rerun releases the same bytes
    # a flush: each step against its own base, the server learning rate on the step and the noise; a 1-d tensor
    bases = [torch.randn(5, generator=g) for _ in range(2)]
    mine = [b + torch.randn(5, generator=g) for b in bases]
    flushed = dp_head_release(
        bases[1], mine, bases, [0.2, 0.3], sigma=0.1, generator=noise_generator("k", "f", 2, "b"), lr=0.5
    )
    step = sum(w * (h.double() - b.double()) for w, h, b in zip((0.2, 0.3), mine, bases, strict=True))
    drawn = gaussian_noise_dense(1, 5, 0.1, noise_generator("k", "f", 2, "b"), torch.float64).reshape(5)
    assert torch.allclose(flushed.double(), bases[1].double() + 0.5 * (step + drawn), atol=1e-6)
    # no published head: the step is the head itself, from zero
    assert torch.equal(head_step(heads[0], None), heads[0].double())
    with pytest.raises(AggregationError, match="shape"):
        head_step(heads[0], torch.zeros(2, 2))
