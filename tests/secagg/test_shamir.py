"""Shamir over GF(2^521 - 1): any T of N reconstruct, fewer are refused, bad shares are survived."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.errors import ConfigError, SecAggError
from chorus_mq.secagg import shamir


@st.composite
def setups(draw):
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, shamir.MAX_X), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=1, max_size=150))
    return n, t, xs, secret


@given(setups(), st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_any_t_of_n_reconstruct_and_fewer_are_refused(setup, rnd):
    n, t, xs, secret = setup
    shares = shamir.split(secret, t, xs)
    assert len(shares) == n
    subsets = list(itertools.combinations(shares, t))
    for subset in rnd.sample(subsets, min(len(subsets), 10)):
        order = list(subset)
        rnd.shuffle(order)
        assert shamir.reconstruct(order, t, len(secret)) == secret
    if t > 1:
        with pytest.raises(SecAggError, match="cannot reconstruct"):
            shamir.reconstruct(shares[: t - 1], t, len(secret))


@given(setups())
@settings(max_examples=40, deadline=None)
def test_share_bytes_round_trip(setup):
    _, t, xs, secret = setup
    for share in shamir.split(secret, t, xs):
        raw = share.to_bytes()
        assert len(raw) == shamir.share_size(len(secret))
        assert shamir.Share.from_bytes(raw, len(secret)) == share


def test_t_minus_one_shares_interpolate_to_something_else():
    # T-1 shares of a degree T-1 polynomial, interpolated as if they were enough, miss the secret
    secret = bytes(range(32))
    for _ in range(20):
        shares = shamir.split(secret, 3, [1, 2, 3])
        try:
            got = shamir.reconstruct(shares[:2], 2, 32)
        except SecAggError:  # the interpolated field element does not even fit 32 bytes
            continue
        assert got != secret


def test_verified_reconstruction_skips_wrong_shares():
    secret = b"\x07" * 32
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    shares[0] = shamir.Share(1, ((shares[0].ys[0] + 1) % shamir.PRIME,))
    got = shamir.reconstruct_verified(shares, 3, 32, lambda s: s == secret)
    assert got == secret
    with pytest.raises(SecAggError, match="matches its commitment"):
        shamir.reconstruct_verified(shares, 3, 32, lambda s: False)


def test_malformed_shares_and_arguments_are_refused():
    with pytest.raises(SecAggError, match="bytes, got"):
        shamir.Share.from_bytes(b"\x00" * 10, 32)
    with pytest.raises(SecAggError, match="x-coordinate"):
        shamir.Share.from_bytes(b"\x00" * shamir.share_size(32), 32)
    with pytest.raises(SecAggError, match="field elements"):
        shamir.Share.from_bytes(b"\x00\x01" + b"\xff" * 66, 32)
    with pytest.raises(ConfigError, match="threshold"):
        shamir.split(b"s", 4, [1, 2, 3])
    with pytest.raises(ConfigError, match="distinct"):
        shamir.split(b"s", 2, [1, 1, 3])
    s = shamir.split(b"s", 2, [1, 2])
    with pytest.raises(SecAggError, match="same x-coordinate"):
        shamir.reconstruct([s[0], s[0]], 2, 1)
