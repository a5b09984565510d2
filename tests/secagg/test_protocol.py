"""A whole secure round in process: dropouts at every phase, hostile clients, exact against float64."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from chorus_mq.errors import PeerMisbehaved, SecAggError, UnmaskRefused
from chorus_mq.names import SecAggPhase, ShareKind
from chorus_mq.secagg.client import SecAggClient
from chorus_mq.secagg.masking import SEALED_BYTES
from chorus_mq.secagg.messages import MaskedInput, UnmaskRequest, UnmaskResponse
from chorus_mq.secagg.server import SecAggServer

from .harness import inputs, make_params, oracle, rel_err, run_round

PHASES = ("advertise", "share", "masked_input", "unmask")


def _check(result, xs, expect_summed):
    assert result.summed == tuple(sorted(expect_summed))
    want = oracle(xs, expect_summed)
    assert rel_err(result.total, want) <= 1e-5
    assert np.abs(result.total - want).max() <= 1e-10  # in fact exact to the encoding step


def test_no_dropouts_sums_everyone_exactly():
    p = make_params()
    xs = inputs(p)
    result, _, _ = run_round(p, xs)
    _check(result, xs, p.cohort)
    assert result.dropped == {} and result.rejected == {}


@pytest.mark.parametrize("phase", PHASES)
def test_dropouts_at_one_phase(phase):
    p = make_params()  # N=10, K=9, T=5: up to K-T = 4 may drop
    xs = inputs(p, seed=1)
    gone = ["c01", "c04", "c07", "c09"]
    result, _, _ = run_round(p, xs, {phase: gone})
    # a client that drops at unmask already sent its masked input: it is summed all the same
    summed = p.cohort if phase == "unmask" else [c for c in p.cohort if c not in gone]
    _check(result, xs, summed)
    if phase != "unmask":
        assert result.dropped == dict.fromkeys(gone, SecAggPhase(phase))


def test_clients_restarted_before_every_phase_resume_from_their_saved_state():
    p = make_params()
    xs = inputs(p, seed=5)
    result, _, clients = run_round(p, xs, {"share": ["c02"], "unmask": ["c06"]}, restart=True)
    _check(result, xs, [c for c in p.cohort if c != "c02"])
    # what a client revealed survives a restart: a later request that counts a summed peer as dropped is refused
    c = sorted(result.summed)[0]
    again = SecAggClient.restore(p, json.loads(json.dumps(clients[c].state())))
    assert again.state() == clients[c].state()
    victim = next(v for v in sorted(again.state()["held"]) if v in result.summed and v != c)
    with pytest.raises(UnmaskRefused, match="already revealed"):
        again.unmask(UnmaskRequest(frozenset(result.summed) - {victim}))


def test_dropouts_at_every_phase_at_once():
    p = make_params()
    xs = inputs(p, seed=2)
    drop = {"advertise": ["c00"], "share": ["c03"], "masked_input": ["c05"], "unmask": ["c08"]}
    result, _, _ = run_round(p, xs, drop)
    _check(result, xs, [c for c in p.cohort if c not in ("c00", "c03", "c05")])
    assert result.dropped == {
        "c00": SecAggPhase.ADVERTISE,
        "c03": SecAggPhase.SHARE,
        "c05": SecAggPhase.MASKED_INPUT,
    }


def test_sparse_graph_tolerates_k_minus_t_dropouts_among_one_clients_neighbours():
    p = make_params(16, length=500, neighbour_count=6)  # T = 4: two of anyone's neighbours may drop
    assert p.threshold == 4 and p.tolerated_dropouts == 2
    xs = inputs(p, seed=3)
    victim_neighbours = sorted(p.graph["c00"])
    result, _, _ = run_round(p, xs, {"masked_input": victim_neighbours[:1], "unmask": victim_neighbours[1:2]})
    _check(result, xs, [c for c in p.cohort if c != victim_neighbours[0]])


def test_too_many_dropouts_abort_with_a_clear_error():
    p = make_params()
    with pytest.raises(SecAggError, match="fewer than the threshold 5: round aborted"):
        run_round(p, inputs(p), {"masked_input": ["c00", "c01", "c02", "c03", "c04", "c05"]})
    # dropping at unmask: the survivors' seeds need T responses; 6 silent leaves 4
    with pytest.raises(SecAggError, match="cannot unmask the sum"):
        run_round(p, inputs(p), {"unmask": ["c00", "c01", "c02", "c03", "c04", "c05"]})


# -- hostile clients ---------------------------------------------------------------------------


class Round:
    """A round driven step by step so a test can swap in a hostile message."""

    def __init__(self, n=10, **kw):
        self.p = make_params(n, **kw)
        self.xs = inputs(self.p, seed=4)
        self.clients = {c: SecAggClient(self.p, c) for c in self.p.cohort}
        self.server = SecAggServer(self.p)

    def advertise(self):
        for c in self.p.cohort:
            self.server.receive_advert(self.clients[c].advertise())
        return self.server.close_advertise()

    def share(self, adverts, tamper=None):
        for c, theirs in adverts.items():
            msg = self.clients[c].share_keys(theirs)
            if tamper and c in tamper:
                msg = tamper[c](msg)
                with pytest.raises(PeerMisbehaved) as err:
                    self.server.receive_shares(msg)
                assert err.value.client == c
                continue
            self.server.receive_shares(msg)
        return self.server.close_share()

    def masked(self, inbox, skip=()):
        for c, sealed in inbox.items():
            if c not in skip:
                self.server.receive_masked(self.clients[c].masked_input(sealed, self.xs[c]))
        return self.server.close_masked()


def test_wrong_length_share_is_refused_naming_the_sender_and_the_round_goes_on():
    r = Round()

    def short(msg):
        sealed = dict(msg.sealed)
        victim = sorted(sealed)[0]
        sealed[victim] = sealed[victim][:-3]
        return dataclasses.replace(msg, sealed=sealed)

    inbox = r.share(r.advertise(), tamper={"c02": short})
    assert "c02" not in inbox and "is 161 bytes, not 164" in r.server.rejected["c02"]
    request = r.masked(inbox)
    for c in sorted(request.survivors):
        r.server.receive_unmask(r.clients[c].unmask(request))
    result = r.server.finish()
    _check(result, r.xs, [c for c in r.p.cohort if c != "c02"])
    assert result.dropped["c02"] == SecAggPhase.SHARE


def test_undecryptable_share_is_named_by_its_recipient_and_the_sender_is_left_out():
    r = Round()
    adverts = r.advertise()
    for c, theirs in adverts.items():
        msg = r.clients[c].share_keys(theirs)
        if c == "c06":  # right length, garbage inside: only the recipient can tell
            sealed = dict(msg.sealed)
            sealed["c01"] = bytes(SEALED_BYTES)
            msg = dataclasses.replace(msg, sealed=sealed)
        r.server.receive_shares(msg)
    inbox = r.server.close_share()
    request = r.masked(inbox)
    assert "c06" not in request.survivors
    assert "does not decrypt" in r.clients["c01"].refused["c06"]
    assert "'c01' could not open its share" in r.server.rejected["c06"]
    for c in sorted(request.survivors):
        r.server.receive_unmask(r.clients[c].unmask(request))
    _check(r.server.finish(), r.xs, [c for c in r.p.cohort if c != "c06"])


def test_wrong_size_masked_input_and_bad_unmask_responses_are_refused():
    r = Round()
    inbox = r.share(r.advertise())
    for c, sealed in inbox.items():
        msg = r.clients[c].masked_input(sealed, r.xs[c])
        if c == "c03":
            msg = dataclasses.replace(msg, masked=msg.masked[:-1])
            with pytest.raises(PeerMisbehaved, match="must be 1000 uint64 words") as err:
                r.server.receive_masked(msg)
            assert err.value.client == "c03"
            continue
        if c == "c04":
            bad = MaskedInput(c, msg.masked, msg.masked_with | {"c99"}, {})
            with pytest.raises(PeerMisbehaved, match="did not exchange shares"):
                r.server.receive_masked(bad)
        r.server.receive_masked(msg)
    request = r.server.close_masked()
    for c in sorted(request.survivors):
        resp = r.clients[c].unmask(request)
        if c == "c05":  # the wrong kind of share for a survivor
            peer = next(p for p, (k, _) in resp.shares.items() if k == ShareKind.SELF_SEED)
            wrong = {**resp.shares, peer: (ShareKind.MASK_KEY, resp.shares[peer][1])}
            with pytest.raises(PeerMisbehaved, match="the self_seed share was asked"):
                r.server.receive_unmask(UnmaskResponse(c, wrong))
            continue
        if c == "c06":  # right length and x, wrong value: the commitment check routes around it
            peer, (kind, raw) = next(iter(sorted(resp.shares.items())))
            forged = raw[:2] + bytes(len(raw) - 3) + b"\x01"
            resp = UnmaskResponse(c, {**resp.shares, peer: (kind, forged)})
        r.server.receive_unmask(resp)
    result = r.server.finish()
    _check(result, r.xs, [c for c in r.p.cohort if c != "c03"])
    assert result.dropped["c03"] == SecAggPhase.MASKED_INPUT


def test_messages_from_outside_the_cohort_or_out_of_turn_are_refused():
    r = Round()
    outsider = SecAggClient(make_params(11), "c10")
    with pytest.raises(PeerMisbehaved, match="not in the round's cohort"):
        r.server.receive_advert(outsider.advertise())
    msg = r.clients["c00"].advertise()
    r.server.receive_advert(msg)
    with pytest.raises(PeerMisbehaved, match="advertised twice"):
        r.server.receive_advert(msg)
    with pytest.raises(SecAggError, match="not accepted now"):
        r.server.close_share()


# -- a lying aggregator ------------------------------------------------------------------------


def _honest_until_masked(seed=5):
    r = Round()
    request = r.masked(r.share(r.advertise()))
    assert request.survivors == frozenset(r.p.cohort)
    return r


def test_declaring_a_live_client_dropped_reveals_its_mask_key_but_never_its_seed():
    r = _honest_until_masked()
    victim = "c07"
    from chorus_mq.secagg.messages import UnmaskRequest

    first = UnmaskRequest(frozenset(r.p.cohort) - {victim})
    answers = {c: r.clients[c].unmask(first) for c in sorted(first.survivors)}
    assert all(a.shares[victim][0] == ShareKind.MASK_KEY for a in answers.values())
    # now ask again with the victim summed, to get its self-seed shares too: every client refuses
    second = UnmaskRequest(frozenset(r.p.cohort))
    for c in sorted(first.survivors):
        with pytest.raises(SecAggError, match=f"already revealed its mask_key share of '{victim}'"):
            r.clients[c].unmask(second)
    # and the victim itself refuses a request that counts it as dropped
    with pytest.raises(SecAggError, match="counts it as dropped"):
        r.clients[victim].unmask(first)


def test_split_views_never_reach_t_shares_of_both_kinds():
    r = _honest_until_masked()
    from chorus_mq.secagg import shamir
    from chorus_mq.secagg.messages import UnmaskRequest

    victim = "c02"
    holders = sorted(r.p.graph[victim])
    half = len(holders) // 2
    seeds, keys = [], []
    for i, c in enumerate(holders):
        request = UnmaskRequest(frozenset(r.p.cohort) - ({victim} if i < half else set()))
        kind, raw = r.clients[c].unmask(request).shares[victim]
        (keys if kind == ShareKind.MASK_KEY else seeds).append(shamir.Share.from_bytes(raw, 32))
        # the same client never hands out the other kind afterwards
        other = UnmaskRequest(frozenset(r.p.cohort) - ({victim} if i >= half else set()))
        with pytest.raises(SecAggError, match="already revealed"):
            r.clients[c].unmask(other)
    assert len(seeds) + len(keys) == r.p.neighbour_count < 2 * r.p.threshold
    assert min(len(seeds), len(keys)) < r.p.threshold
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.reconstruct(keys, r.p.threshold, 32)


def test_a_sharded_unmask_equals_the_whole_one():
    from chorus_mq.secagg.server import unmask_slice

    p = make_params(length=10_007)
    xs = inputs(p, seed=9)
    result, server, _ = run_round(p, xs, {"masked_input": ["c02"], "unmask": ["c05"]})
    server.phase = SecAggPhase.UNMASK  # unmask again, in shards, from the same messages
    seeds = server.unmask_seeds()
    survivors = sorted(server.survivors)
    bounds = [0, 13, 4096, 4101, 8000, 10_007]  # uneven, not on ChaCha20 block boundaries
    parts = [
        unmask_slice([server.masked[w].masked[lo:hi] for w in survivors], seeds, lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    assert np.array_equal(np.concatenate(parts), result.encoded)
