"""Server-side DP for the linear strategies (``aggregation.dp_linear``): the trained factor's clipped steps,
weighted and noised, against a float64 oracle with the noise regenerated from the same seed."""

from __future__ import annotations

import math

import pytest
import torch

from chorus_mq.aggregation.dp import aggregate_sensitivity, gaussian_noise_dense, noise_generator, release_sigma
from chorus_mq.aggregation.dp_linear import adapter_clip_factor, linear_dp_release, trained_step
from chorus_mq.aggregation.server_opt import PreviousFactors
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import Factor

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("trains", [Factor.LORA_B, Factor.LORA_A, Factor.LORA_R])
def test_a_round_releases_the_clipped_weighted_steps_plus_the_noise_on_the_trained_factor_alone(trains):
    g = _gen(0)
    A, B, R = torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g), torch.randn(4, 4, generator=g)
    current = PreviousFactors(A, B, 2.0, R if trains == Factor.LORA_R else None)
    x_v = {Factor.LORA_A: A, Factor.LORA_B: B, Factor.LORA_R: R}[trains]
    uploads = [(x_v + 0.5 * torch.randn(x_v.shape, generator=g), 2.0) for _ in range(3)]
    C, K, z = 1.5, 4, 0.7
    clips = [adapter_clip_factor([float(((x.double() - x_v.double()) ** 2).sum())], C) for x, _ in uploads]
    assert min(clips) < 1.0  # the steps' norms are above C: every one is clipped here
    weights = [c / K for c in clips]
    sigma = release_sigma(z, C, K)
    assert sigma == z * aggregate_sensitivity(C, [1.0 / K] * K) == pytest.approx(z * C / K)

    def release():  # the noise from the round's key, afresh each call
        gen = noise_generator("k", "f", 1, "m")
        return linear_dp_release(current, uploads, [current] * 3, weights, trains=trains, sigma=sigma, generator=gen)

    out = release()
    noise = gaussian_noise_dense(*x_v.shape, sigma, noise_generator("k", "f", 1, "m"), F64)
    want = (
        x_v.double() + sum(w * (x.double() - x_v.double()) for (x, _), w in zip(uploads, weights, strict=True)) + noise
    )
    got = {Factor.LORA_A: out.A, Factor.LORA_B: out.B, Factor.LORA_R: out.R}[trains]
    assert got is not None and got.dtype == torch.float32
    assert float((got.double() - want).norm() / want.norm()) < 1e-6
    for which, frozen in ((Factor.LORA_A, A), (Factor.LORA_B, B)):  # the frame as published, bit for bit
        if which != trains:
            assert torch.equal({Factor.LORA_A: out.A, Factor.LORA_B: out.B}[which], frozen)
    assert out.residual is None and out.scaling == 2.0
    again = release()
    assert torch.equal(again.A, out.A) and torch.equal(again.B, out.B)  # a rerun releases the same bytes


def test_a_flush_steps_each_delta_against_its_own_base_and_scales_the_noise_by_the_server_lr():
    g = _gen(1)
    A = torch.randn(4, 12, generator=g)
    versions = {v: PreviousFactors(A, torch.randn(16, 4, generator=g), 2.0) for v in (0, 1)}
    uploads = [(versions[b].B + torch.randn(16, 4, generator=g), 2.0) for b in (0, 1, 1)]
    bases = [versions[b] for b in (0, 1, 1)]
    weights, lr, sigma = [0.2, 0.3, 0.1], 0.8, 0.05
    out = linear_dp_release(
        versions[1], uploads, bases, weights, trains=Factor.LORA_B, sigma=sigma, generator=_gen(5), lr=lr
    )
    step = sum(w * (x.double() - b.B.double()) for (x, _), b, w in zip(uploads, bases, weights, strict=True))
    want = versions[1].B.double() + lr * (step + gaussian_noise_dense(16, 4, sigma, _gen(5), F64))
    assert float((out.B.double() - want).norm() / want.norm()) < 1e-6
    assert torch.equal(out.A, A) and out.residual is None


def test_a_step_is_taken_in_the_published_scaling_and_a_changed_frame_is_refused():
    x, base = torch.ones(2, 2), torch.full((2, 2), 0.5)
    assert torch.equal(trained_step(x, 4.0, base, 2.0, 2.0), torch.full((2, 2), 1.5, dtype=F64))
    assert adapter_clip_factor([9.0, 16.0], 1.0) == pytest.approx(0.2)  # adapter-wide: ||(3, 4)|| = 5
    assert adapter_clip_factor([0.0], 1.0) == 1.0 and adapter_clip_factor([0.25], 1.0) == 1.0
    A = torch.randn(2, 3, generator=_gen(2))
    current, other = PreviousFactors(A, torch.zeros(4, 2), 1.0), PreviousFactors(A + 1e-7, torch.zeros(4, 2), 1.0)
    with pytest.raises(AggregationError, match="share the frozen frame"):
        linear_dp_release(
            current, [(torch.ones(4, 2), 1.0)], [other], [1.0], trains=Factor.LORA_B, sigma=0.1, generator=_gen(3)
        )
    with pytest.raises(ConfigError, match="quorum"):
        release_sigma(1.0, 1.0, 0)
    with pytest.raises(ConfigError, match="clip norm"):
        adapter_clip_factor([1.0], math.inf)
