"""DP with secure aggregation: client-side clipping bounds each input, the noise on the sum has the stated sigma."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.aggregation.dp import PrivacyAccountant, noise_generator
from chorus_mq.errors import ConfigError
from chorus_mq.secagg.dp import clip_and_weight, noise_sigma, noise_sum
from chorus_mq.secagg.encoding import Encoding

from .harness import make_params, oracle, rel_err, run_round

torch.set_num_threads(1)


@given(st.integers(1, 500), st.floats(1e-3, 1e3), st.floats(0.01, 10.0), st.floats(0.0, 1.0), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_clipped_inputs_have_bounded_norm_and_always_encode(n, scale, clip, weight, seed):
    update = np.random.default_rng(seed).standard_normal(n) * scale
    x = clip_and_weight(update, clip_norm=clip, weight=weight)
    # float32 rounds each element: relatively (1e-6) and, for a tiny weight's subnormals, absolutely
    subnormal = float(np.finfo(np.float32).smallest_subnormal)
    assert np.linalg.norm(x.astype(np.float64)) <= clip * weight * (1 + 1e-6) + np.sqrt(n) * subnormal
    Encoding().encode(x)  # never refused
    if np.linalg.norm(update) <= clip:  # already inside: only the weight applies
        np.testing.assert_allclose(x, (update * weight).astype(np.float32), rtol=1e-6)


def test_clip_settings_that_could_leave_the_encoding_range_are_refused():
    with pytest.raises(ConfigError, match="exceeds the encoding range 64"):
        clip_and_weight(np.ones(3), clip_norm=100.0, weight=1.0)
    with pytest.raises(ConfigError, match="NaN"):
        clip_and_weight(np.array([np.nan]), clip_norm=1.0, weight=0.5)


def test_secure_round_of_clipped_inputs_plus_noise_with_the_stated_sigma():
    p = make_params(10, length=200_000)
    rng = np.random.default_rng(3)
    weights = {c: 1.0 / len(p.cohort) for c in p.cohort}  # fixed and public, as the mechanism needs
    xs = {c: clip_and_weight(rng.standard_normal(p.length) * 0.01, clip_norm=1.0, weight=weights[c]) for c in p.cohort}
    result, _, _ = run_round(p, xs, {"masked_input": ["c02"]})
    assert rel_err(result.total, oracle(xs, result.summed)) <= 1e-5
    sigma = noise_sigma(clip_norm=1.0, weights=list(weights.values()), noise_multiplier=1.1)
    assert sigma == pytest.approx(1.1 * 1.0 / 10)
    noised = noise_sum(result.total, sigma, noise_generator("key", "fed", 3, "shard-0"))
    noise = noised - result.total
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(p.length)
    assert noise.std() == pytest.approx(sigma, rel=0.01)
    # the same key, round and shard give the same noise (a re-run releases one copy, not two to average)
    again = noise_sum(result.total, sigma, noise_generator("key", "fed", 3, "shard-0"))
    assert np.array_equal(again, noised)
    # the existing accountant charges it like any DP round
    acc = PrivacyAccountant()
    acc.spend(1.1, rounds=5)
    assert 0 < acc.epsilon(1e-5) < 20
