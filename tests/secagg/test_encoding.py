"""Fixed-point encoding modulo 2^64: round trips, exact sums, the overflow bound, the range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from chorus_mq.errors import ConfigError, SecAggError
from chorus_mq.secagg.encoding import U64, Encoding
from chorus_mq.secagg.prg import add_mask

ENC = Encoding()
finite32 = st.floats(-64, 64, width=32, allow_nan=False, allow_infinity=False)


def test_default_bounds_are_documented_numbers():
    assert ENC.scale == 2.0**40 and ENC.clip == 64.0
    assert ENC.max_inputs == 2**17 - 1  # N * 64 * 2^40 < 2^63
    assert ENC.max_inputs * ENC.clip * ENC.scale < 2**63


@given(arrays(np.float32, st.integers(1, 200), elements=finite32))
@settings(max_examples=60, deadline=None)
def test_round_trip_is_exact_to_half_a_step(x):
    back = ENC.decode_sum(ENC.encode(x), 1)
    assert np.abs(back - x.astype(np.float64)).max() <= 0.5 / ENC.scale
    big = np.abs(x) >= 2.0**-16  # float32 values this large are multiples of 2^-40: no rounding at all
    assert np.array_equal(back[big], x[big].astype(np.float64))


@given(st.integers(2, 40), st.integers(1, 300), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_sum_of_encoded_inputs_decodes_to_the_float64_sum(n, length, seed):
    rng = np.random.default_rng(seed)
    xs = (rng.standard_normal((n, length)) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32)
    total = np.zeros(length, dtype=U64)
    for x in xs:
        np.add(total, ENC.encode(x), out=total)
    want = xs.astype(np.float64).sum(axis=0)
    got = ENC.decode_sum(total, n)
    assert np.abs(got - want).max() <= ENC.error_bound(n)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_masks_wrap_and_cancel_modulo_2_64():
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    y = ENC.encode(x)
    add_mask(y, b"k" * 32, +1)
    assert not np.array_equal(y, ENC.encode(x))
    add_mask(y, b"k" * 32, -1)
    assert np.array_equal(ENC.decode_sum(y, 1), x.astype(np.float64))


def test_no_overflow_at_the_documented_bound():
    n = ENC.max_inputs
    for sign in (1.0, -1.0):
        one = ENC.encode(np.full(4, sign * ENC.clip, dtype=np.float32))
        total = one * np.uint64(n)  # n inputs at the edge of the range, summed modulo 2^64
        assert np.array_equal(ENC.decode_sum(total, n), np.full(4, sign * ENC.clip * n))
    with pytest.raises(SecAggError, match="cannot decode a sum of"):
        ENC.decode_sum(np.zeros(4, dtype=U64), n + 1)


def test_out_of_range_is_refused_or_clipped_as_configured():
    x = np.array([0.5, 65.0, -100.0], dtype=np.float32)
    with pytest.raises(SecAggError, match="above the encoding range 64"):
        ENC.encode(x)
    clipped = Encoding(on_range="clip").encode(x)
    assert np.array_equal(ENC.decode_sum(clipped, 1), [0.5, 64.0, -64.0])
    for bad in (np.nan, np.inf):
        with pytest.raises(SecAggError, match="NaN or infinite"):
            Encoding(on_range="clip").encode(np.array([0.0, bad]))


def test_encodings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="scale bits"):
        Encoding(scale_bits=60)
    with pytest.raises(ConfigError, match="clip"):
        Encoding(clip=-1.0)
    with pytest.raises(ConfigError, match="leaves no room"):
        Encoding(scale_bits=52, clip=2.0**12)
