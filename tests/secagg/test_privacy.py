"""Honest-but-curious aggregator: nothing it sees or can compute correlates with one client's input.

The aggregator's view is every message (keys, sealed shares, commitments, masked inputs, revealed
shares) plus everything it can derive from them: survivors' inputs with their self masks removed,
every mask it can rebuild from a dropped client's reconstructed key, and, when it lies about who
dropped, a live client's input stripped of all its pairwise masks. Each is compared with each
client's input after regressing out the published sum (partial correlation): |r| <= 0.01 over
2^17 elements (about 3.6 standard deviations of a true zero). A positive control shows the test
would see a leak: the same statistic on an input stripped of all its masks is about 1.
"""

from __future__ import annotations

import numpy as np

from chorus_mq.names import ShareKind
from chorus_mq.secagg import keys, shamir
from chorus_mq.secagg.encoding import U64
from chorus_mq.secagg.masking import pairwise_seed
from chorus_mq.secagg.messages import UnmaskRequest
from chorus_mq.secagg.prg import add_mask

from .harness import inputs, make_params, run_round

LENGTH = 1 << 18  # 0.01 is 5 sd of a null correlation at this length: many comparisons stay quiet


def partial_corr(a: np.ndarray, b: np.ndarray, control: np.ndarray) -> float:
    """corr(a, b) after removing from both their least-squares fit on [1, control]."""
    design = np.column_stack([np.ones_like(control), control])

    def resid(v: np.ndarray) -> np.ndarray:
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        return v - design @ coef

    ra, rb = resid(a.astype(np.float64)), resid(b.astype(np.float64))
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def as_signed(y: np.ndarray) -> np.ndarray:
    return y.view(np.int64).astype(np.float64)


def _reconstruct(server, peer, kind, secret_len=32):
    return shamir.reconstruct(server._shares_of(peer, kind), server.params.threshold, secret_len)


def test_nothing_the_aggregator_sees_or_derives_correlates_with_an_input():
    p = make_params(10, length=LENGTH)
    xs = inputs(p, seed=11)
    dropped = "c03"
    result, server, clients = run_round(p, xs, {"masked_input": [dropped]})
    published = result.total
    views: dict[str, np.ndarray] = {}
    for c, msg in server.masked.items():
        views[f"masked {c}"] = as_signed(msg.masked)
    key_d = _reconstruct(server, dropped, ShareKind.MASK_KEY)
    assert keys.public_of(key_d) == server.adverts[dropped].mask_public  # the aggregator really has it
    for w in result.summed:
        z = server.masked[w].masked.copy()
        add_mask(z, _reconstruct(server, w, ShareKind.SELF_SEED), -1)
        if dropped in server.masked[w].masked_with:
            seed = pairwise_seed(p, key_d, server.adverts[w].mask_public, w, dropped)
            add_mask(z, seed, -p.mask_sign(w, dropped))
        views[f"{w} without self mask and the dropped client's mask"] = as_signed(z)

    small = bytearray()
    for a in server.adverts.values():
        small += a.cipher_public + a.mask_public
    for b in server.bundles.values():
        small += b.seed_commitment + b"".join(b.sealed[k] for k in sorted(b.sealed))
    for r in server.responses.values():
        small += b"".join(raw for _, raw in (r.shares[k] for k in sorted(r.shares)))
    stream = np.frombuffer(bytes(small), dtype=np.uint8).astype(np.float64)
    assert stream.size > 10_000

    worst = 0.0
    for c in p.cohort:
        x = xs[c].astype(np.float64)
        for view in views.values():
            worst = max(worst, abs(partial_corr(view, x, published)))
        n = stream.size
        # the short objects: same statistic, bound scaled to their length (3.6 standard deviations)
        assert abs(partial_corr(stream, x[:n], published[:n])) <= 3.6 / np.sqrt(n)
    assert worst <= 0.01, worst

    # positive control: strip a survivor of *all* its masks (only the client could): r is about 1
    w = result.summed[0]
    bare = server.masked[w].masked.copy()
    add_mask(bare, clients[w]._seed, -1)
    for peer in server.masked[w].masked_with:
        seed = pairwise_seed(p, clients[w]._mask.private, server.adverts[peer].mask_public, w, peer)
        add_mask(bare, seed, -p.mask_sign(w, peer))
    assert partial_corr(as_signed(bare), xs[w], published) > 0.99


def test_a_lying_aggregator_that_strips_a_live_clients_pairwise_masks_still_sees_noise():
    p = make_params(10, length=LENGTH)
    xs = inputs(p, seed=12)
    from .test_protocol import Round

    r = Round(n=10, length=LENGTH)
    r.xs = xs
    request = r.masked(r.share(r.advertise()))
    victim = "c07"
    lie = UnmaskRequest(request.survivors - {victim})
    server = r.server
    server.survivors = lie.survivors  # the lie: the aggregator now treats the victim as dropped
    for c in sorted(lie.survivors):
        server.receive_unmask(r.clients[c].unmask(lie))
    key_v = shamir.reconstruct(server._shares_of(victim, ShareKind.MASK_KEY), p.threshold, 32)
    assert keys.public_of(key_v) == server.adverts[victim].mask_public
    z = server.masked[victim].masked.copy()
    for peer in server.masked[victim].masked_with:
        seed = pairwise_seed(p, key_v, server.adverts[peer].mask_public, victim, peer)
        add_mask(z, seed, -p.mask_sign(victim, peer))
    honest_sum = np.sum([xs[c].astype(np.float64) for c in p.cohort], axis=0)
    # what is left is the encoded input plus the self mask: uniform, whatever the input
    assert abs(partial_corr(as_signed(z), xs[victim], honest_sum)) <= 0.01
    assert server._shares_of(victim, ShareKind.SELF_SEED) == []
    assert z.dtype == U64
