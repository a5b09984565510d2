"""Key agreement, the mask PRG, sealed shares and the neighbour graph."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus_mq.errors import ConfigError, SecAggError
from chorus_mq.secagg import graph, keys, prg, sealing
from chorus_mq.secagg.encoding import U64

from .harness import make_params


def test_agreement_is_symmetric_and_bound_to_its_info():
    a, b, c = keys.generate(), keys.generate(), keys.generate()
    info = keys.context("pair-mask", "fed", 1, "a", "b")
    k_ab = keys.agree(a.private, b.public, info)
    assert k_ab == keys.agree(b.private, a.public, info) and len(k_ab) == 32
    assert k_ab != keys.agree(a.private, b.public, keys.context("pair-mask", "fed", 2, "a", "b"))
    assert k_ab != keys.agree(a.private, c.public, info)
    assert keys.public_of(a.private) == a.public
    assert "private" not in repr(a) and a.private.hex() not in repr(a)


def test_low_order_and_malformed_keys_are_refused():
    a = keys.generate()
    with pytest.raises(SecAggError, match="key agreement failed"):
        keys.agree(a.private, bytes(32), b"info")  # the all-zero point: the shared secret would be 0
    with pytest.raises(SecAggError, match="32 bytes"):
        keys.agree(a.private, b"\x01" * 31, b"info")


def test_context_is_unambiguous():
    assert keys.context("ab", "c") != keys.context("a", "bc")
    assert keys.context(1, "x") != keys.context("1x")


@given(st.integers(1, 3 * (1 << 18) + 7), st.binary(min_size=32, max_size=32))
@settings(max_examples=8, deadline=None)
def test_masks_are_deterministic_and_cancel(length, seed):
    m = prg.mask(seed, length)
    assert m.dtype == U64 and m.shape == (length,)
    assert np.array_equal(m, prg.mask(seed, length))
    # a longer mask starts with the shorter one: masks of one seed are prefixes of one keystream
    assert np.array_equal(prg.mask(seed, length + 5)[:length], m)
    acc = np.arange(length, dtype=U64)
    prg.add_mask(acc, seed, +1)
    prg.add_mask(acc, seed, -1)
    assert np.array_equal(acc, np.arange(length, dtype=U64))


def test_masks_look_uniform_and_differ_by_seed():
    m1, m2 = prg.mask(b"a" * 32, 1 << 17), prg.mask(b"b" * 32, 1 << 17)
    assert (m1 != m2).mean() > 0.999
    bits = np.unpackbits(m1.view(np.uint8)).astype(np.float64)
    assert abs(bits.mean() - 0.5) < 0.002  # 8.4M bits: std 0.00017
    as_float = m1.view(np.int64).astype(np.float64)
    assert abs(np.corrcoef(as_float[:-1], as_float[1:])[0, 1]) < 0.02


def test_prg_refuses_bad_arguments():
    with pytest.raises(SecAggError, match="32 bytes"):
        prg.mask(b"short", 10)
    with pytest.raises(SecAggError, match="sign"):
        prg.add_mask(np.zeros(3, dtype=U64), b"k" * 32, 2)
    with pytest.raises(SecAggError, match="flat uint64"):
        prg.add_mask(np.zeros(3, dtype=np.int64), b"k" * 32, 1)  # type: ignore[arg-type]


def _seal(plain: bytes, frm: keys.KeyPair, to: keys.KeyPair, **over) -> bytes:
    kw = {"federation": "fed", "round_": 1, "sender": "a", "recipient": "b"} | over
    return sealing.seal(plain, private=frm.private, peer_public=to.public, **kw)


def _open(blob: bytes, frm: keys.KeyPair, to: keys.KeyPair, **over) -> bytes:
    kw = {"federation": "fed", "round_": 1, "sender": "a", "recipient": "b"} | over
    return sealing.open_sealed(blob, private=to.private, peer_public=frm.public, **kw)


def test_sealed_shares_open_only_for_their_recipient_and_context():
    a, b, eve = keys.generate(), keys.generate(), keys.generate()
    blob = _seal(b"share bytes", a, b)
    assert len(blob) == sealing.sealed_size(11)
    assert _open(blob, a, b) == b"share bytes"
    assert _seal(b"share bytes", a, b) != blob  # fresh nonce every time
    with pytest.raises(SecAggError, match="does not decrypt"):
        _open(blob, a, eve)  # a third party's key
    for over in ({"round_": 2}, {"federation": "other"}, {"sender": "c"}, {"recipient": "c"}):
        with pytest.raises(SecAggError, match="does not decrypt"):
            _open(blob, a, b, **over)
    tampered = bytearray(blob)
    tampered[20] ^= 1
    with pytest.raises(SecAggError, match="does not decrypt"):
        _open(bytes(tampered), a, b)
    with pytest.raises(SecAggError, match="at least"):
        _open(b"short", a, b)


@given(st.integers(3, 40), st.data())
@settings(max_examples=60, deadline=None)
def test_neighbour_graph_is_symmetric_regular_and_deterministic(n, data):
    cohort = [f"c{i}" for i in range(n)]
    choices = [k for k in range(1, n) if k == n - 1 or k % 2 == 0]
    k = data.draw(st.sampled_from(choices))
    g = graph.neighbours(cohort, k, b"seed" * 4)
    assert g == graph.neighbours(cohort, k, b"seed" * 4)
    for c, ns in g.items():
        assert len(ns) == k and c not in ns
        assert all(c in g[p] for p in ns)


def test_graph_depends_on_the_seed_and_refuses_bad_k():
    cohort = [f"c{i}" for i in range(30)]
    assert graph.neighbours(cohort, 4, b"x" * 16) != graph.neighbours(cohort, 4, b"y" * 16)
    with pytest.raises(ConfigError, match="even"):
        graph.neighbours(cohort, 5, b"x" * 16)
    with pytest.raises(ConfigError, match=r"1\.\.29"):
        graph.neighbours(cohort, 30, b"x" * 16)
    assert graph.default_neighbours(10) == 9 and graph.default_neighbours(100) == 28


def test_params_defaults_and_refusals():
    p = make_params(10)
    assert (p.neighbour_count, p.threshold, p.tolerated_dropouts) == (9, 5, 4)
    with pytest.raises(ConfigError, match="above K/2"):
        make_params(10, threshold=4)
    with pytest.raises(ConfigError, match="at least 3 clients"):
        make_params(2)
    with pytest.raises(ConfigError, match="even"):
        make_params(10, neighbour_count=5)
