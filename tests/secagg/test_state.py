"""A secure round through Redis: signed records, fenced quorum/deadline transitions, per-recipient deliveries."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import redis as redis_lib

from chorus_mq.errors import PeerMisbehaved
from chorus_mq.names import EventType, SecAggClose, SecAggPhase
from chorus_mq.secagg import wire
from chorus_mq.secagg.client import SecAggClient
from chorus_mq.secagg.encoding import U64
from chorus_mq.secagg.messages import UnmaskRequest
from chorus_mq.secagg.params import SecAggParams
from chorus_mq.state import Acl, ClientRegistry, EventLog, FederationKeys
from chorus_mq.state.secagg import SecAggRounds
from chorus_mq.state.secagg_flow import advance, adverts_of, ingest, shares_of, unmask_suffices

from .harness import oracle, rel_err

T0 = 1_000_000.0
PHASE_S = 60.0


class Driver:
    """Clients and a worker, talking only through Redis (and a dict standing in for the store)."""

    def __init__(self, redis, n=8, length=2000, secrets=None):
        self.redis = redis
        cohort = tuple(f"c{i}" for i in range(n))
        self.p = SecAggParams(federation="fed", round=1, cohort=cohort, length=length, graph_seed=b"g" * 32)
        self.rounds = SecAggRounds(redis, "fed")
        self.secrets = secrets or {c: f"secret-{c}-0123456789" for c in cohort}
        self.clients = {c: SecAggClient(self.p, c) for c in cohort}
        rng = np.random.default_rng(7)
        self.xs = {c: (rng.standard_normal(length) * 0.01).astype(np.float32) for c in cohort}
        self.store: dict[str, bytes] = {}
        self.now = T0
        assert self.rounds.open(1, cohort, self.p.threshold, PHASE_S, now=self.now).status == "created"

    def load(self, ref):
        raw = self.store[ref.key]
        if hashlib.sha256(raw).hexdigest() != ref.sha256:
            raise PeerMisbehaved(ref.client, "its masked input does not match its sha256")
        return np.frombuffer(raw, dtype=U64).copy()

    def send(self, c, phase, payload, secret=None):
        rec = wire.PhaseRecord("fed", 1, c, phase, payload).signed(secret or self.secrets[c])
        rec = wire.PhaseRecord.parse(rec.to_json())  # as a worker reads it from the inbox
        return ingest(self.rounds, self.p, rec, self.secrets.get(c), load=self.load, now=self.now)

    def close(self, everyone_sent):
        if not everyone_sent:
            self.now += PHASE_S + 1
        reply, result = advance(
            self.rounds, self.p, "quorum" if everyone_sent else "deadline", load=self.load, now=self.now
        )
        return reply, result

    def run(self, drop=None):
        drop = drop or {}
        gone: set[str] = set()
        result = None
        for phase in (SecAggPhase.ADVERTISE, SecAggPhase.SHARE, SecAggPhase.MASKED_INPUT, SecAggPhase.UNMASK):
            gone |= set(drop.get(phase.value, ()))
            members = self.rounds.members(1, phase)
            for c in sorted(members - gone):
                reply = self.send(c, phase, self.payload(c, phase))
                assert reply.status in ("accepted", "fired"), (c, phase, reply)
            reply, result = self.close(not (members & gone))
            assert reply.status == "ok", reply
        return result

    def payload(self, c, phase):
        client = self.clients[c]
        got = self.rounds.delivered(1, c)
        if phase is SecAggPhase.ADVERTISE:
            return wire.advertise_payload(client.advertise())
        if phase is SecAggPhase.SHARE:
            return wire.share_payload(client.share_keys(adverts_of(got)))
        if phase is SecAggPhase.MASKED_INPUT:
            msg = client.masked_input(shares_of(got), self.xs[c])
            raw = msg.masked.tobytes()
            key = f"fed/secagg/000001/{c}"
            self.store[key] = raw
            return wire.masked_payload(key, hashlib.sha256(raw).hexdigest(), msg.masked_with, msg.refused)
        state = self.rounds.state(1)
        return wire.unmask_payload(client.unmask(UnmaskRequest(frozenset(state.survivors))))


def test_secure_round_through_redis_with_dropouts_at_every_phase(any_redis):
    d = Driver(any_redis, n=10)  # K=9, T=5: K-T = 4 may drop
    result = d.run({"advertise": ["c1"], "share": ["c2"], "masked_input": ["c3"], "unmask": ["c4"]})
    assert result is not None
    assert result.summed == ("c0", "c4", "c5", "c6", "c7", "c8", "c9")
    assert rel_err(result.total, oracle(d.xs, result.summed)) <= 1e-5
    state = d.rounds.state(1)
    assert state.phase is SecAggPhase.DONE and state.survivors == result.summed
    events = [e for e in EventLog(any_redis, "fed").read() if e.type is EventType.SECAGG_PHASE]
    assert [e.get("phase") for e in events] == ["advertise", "share", "masked_input", "unmask", "done"]
    assert [e.get("closed_by") for e in events[1:]] == ["deadline", "deadline", "deadline", "deadline"]
    # each client's delivery hash holds its own neighbours' keys and only the shares sealed to it
    for c in ("c0", "c5"):
        got = d.rounds.delivered(1, c)
        senders = {f[len("share:") :] for f in got if f.startswith("share:")}
        assert senders == {"c0", "c3", "c4", "c5", "c6", "c7", "c8", "c9"} - {c}
        sealed_to_c = {s: d.rounds.submissions(1, SecAggPhase.SHARE)[s]["sealed"][c] for s in senders}
        assert {s: got[f"share:{s}"] for s in senders} == sealed_to_c


def test_no_dropouts_close_at_quorum(any_redis):
    d = Driver(any_redis, n=5)
    result = d.run()
    assert result.summed == d.p.cohort and rel_err(result.total, oracle(d.xs, d.p.cohort)) <= 1e-5
    events = [e for e in EventLog(any_redis, "fed").read() if e.type is EventType.SECAGG_PHASE]
    assert {e.get("closed_by") for e in events[1:]} == {"quorum"}


def _to_unmask(d, drop_at_masked=()):
    """Every phase up to the unmask request, everyone sending but ``drop_at_masked`` (silent at the masked input)."""
    for phase in (SecAggPhase.ADVERTISE, SecAggPhase.SHARE, SecAggPhase.MASKED_INPUT):
        gone = set(drop_at_masked) if phase is SecAggPhase.MASKED_INPUT else set()
        for c in sorted(d.rounds.members(1, phase) - gone):
            assert d.send(c, phase, d.payload(c, phase)).status in ("accepted", "fired")
        assert d.close(not gone)[0].status == "ok"
    return sorted(d.rounds.members(1, SecAggPhase.UNMASK))


def _answer(d, clients):
    for c in clients:
        assert d.send(c, SecAggPhase.UNMASK, d.payload(c, SecAggPhase.UNMASK)).status == "accepted"


def test_unmask_closes_enough_once_the_responses_reconstruct_every_mask(any_redis):
    """c3 drops before its masked input (its mask key is needed), c6..c8 fall silent at unmask. K = 9 (every other
    client), T = 5: five answers leave each answering client's own self-mask seed with four shares; the sixth makes
    every seed reconstruct, and the phase closes at once, 'enough', with the exact sum of all nine survivors."""
    d = Driver(any_redis, n=10)
    survivors = _to_unmask(d, drop_at_masked=["c3"])
    assert len(survivors) == 9 and d.p.threshold == 5
    _answer(d, survivors[:5])
    assert not unmask_suffices(d.rounds, d.p)
    reply, result = advance(d.rounds, d.p, SecAggClose.ENOUGH, load=d.load, now=d.now)
    assert reply.status == "not_due" and result is None and d.rounds.state(1).phase is SecAggPhase.UNMASK
    _answer(d, survivors[5:6])
    assert unmask_suffices(d.rounds, d.p)
    before = d.rounds.state(1)
    reply, result = advance(d.rounds, d.p, SecAggClose.ENOUGH, load=d.load, now=d.now)  # before the deadline
    assert reply.status == "ok" and d.now < before.deadline
    assert result.summed == tuple(survivors) and rel_err(result.total, oracle(d.xs, result.summed)) <= 1e-5
    state = d.rounds.state(1)
    assert state.phase is SecAggPhase.DONE and state.survivors == tuple(survivors)
    assert any_redis.hget(FederationKeys("fed").secagg(1), "unmask_closed_by") == "enough"
    last = EventLog(any_redis, "fed").read()[-1]
    assert (last.get("phase"), last.get("closed"), last.get("closed_by")) == ("done", "unmask", "enough")
    # fenced: a second closer at the old epoch changes nothing; a late answer is refused as out of phase
    members = survivors[:6]
    again = d.rounds.close(1, SecAggPhase.UNMASK, before.epoch, SecAggClose.ENOUGH, members=members, now=d.now)
    assert again.status == "stale" and d.rounds.state(1).epoch == state.epoch
    late = survivors[6]
    payload = wire.unmask_payload(d.clients[late].unmask(UnmaskRequest(frozenset(survivors))))
    assert d.send(late, SecAggPhase.UNMASK, payload).status == "stale"
    assert late not in d.rounds.submissions(1, SecAggPhase.UNMASK)


def test_too_few_answers_keep_the_unmask_phase_open_until_its_deadline(any_redis):
    """T answers of six (K = 5, every other client) leave each answering client's own self-mask seed with T - 1
    shares: 'enough' closes nothing, and the deadline decides as before (here: the sum cannot be unmasked)."""
    d = Driver(any_redis, n=6)  # K = 5, T = 3
    survivors = _to_unmask(d)
    _answer(d, survivors[:3])
    assert not unmask_suffices(d.rounds, d.p)
    for _ in range(2):  # the close refuses, and a direct close naming fewer than T members is not due either
        reply, _ = advance(d.rounds, d.p, SecAggClose.ENOUGH, load=d.load, now=d.now)
        assert reply.status == "not_due" and d.rounds.state(1).phase is SecAggPhase.UNMASK
    state = d.rounds.state(1)
    short = d.rounds.close(1, SecAggPhase.UNMASK, state.epoch, SecAggClose.ENOUGH, members=survivors[:2], now=d.now)
    assert short.status == "not_due" and d.rounds.state(1).phase is SecAggPhase.UNMASK
    assert not [e for e in EventLog(any_redis, "fed").read() if e.get("phase") == "done"]
    reply, result = d.close(False)  # at the deadline, as before: these answers cannot unmask the sum
    assert reply.status == "aborted" and result is None and "cannot unmask" in d.rounds.state(1).reason


def test_hostile_records_are_refused_and_nothing_is_stored(any_redis):
    d = Driver(any_redis)
    adv = wire.advertise_payload(d.clients["c0"].advertise())
    with pytest.raises(PeerMisbehaved, match="signature does not verify") as err:
        d.send("c0", SecAggPhase.ADVERTISE, adv, secret="not-c0s-secret-at-all")
    assert err.value.client == "c0"
    with pytest.raises(PeerMisbehaved, match="mask_public is 31 bytes"):
        d.send("c1", SecAggPhase.ADVERTISE, {**adv, "mask_public": wire.b64(b"x" * 31)})
    assert d.rounds.submissions(1, SecAggPhase.ADVERTISE) == {}
    assert d.send("c0", SecAggPhase.ADVERTISE, adv).status == "accepted"
    assert d.send("c0", SecAggPhase.ADVERTISE, adv).status == "duplicate"
    assert d.send("c0", SecAggPhase.SHARE, {"sealed": {}, "seed_commitment": ""}).status == "stale"
    for c in d.p.cohort[1:]:
        d.send(c, SecAggPhase.ADVERTISE, wire.advertise_payload(d.clients[c].advertise()))
    assert d.close(True)[0].status == "ok"
    # a share bundle with one short ciphertext names its sender and is not stored
    bundle = wire.share_payload(d.clients["c2"].share_keys(adverts_of(d.rounds.delivered(1, "c2"))))
    peer = sorted(bundle["sealed"])[0]
    short = {**bundle, "sealed": {**bundle["sealed"], peer: wire.b64(b"\0" * 100)}}
    with pytest.raises(PeerMisbehaved, match=f"the sealed share for '{peer}' is 100 bytes") as err:
        d.send("c2", SecAggPhase.SHARE, short)
    assert err.value.client == "c2" and d.rounds.submissions(1, SecAggPhase.SHARE) == {}
    assert d.send("c2", SecAggPhase.SHARE, bundle).status == "accepted"


def test_closing_is_fenced_and_too_few_abort(any_redis):
    d = Driver(any_redis, n=5)  # K=4, T=3
    rounds = d.rounds
    for c in ("c0", "c1"):
        d.send(c, SecAggPhase.ADVERTISE, wire.advertise_payload(d.clients[c].advertise()))
    assert rounds.close(1, SecAggPhase.ADVERTISE, 1, "quorum", now=d.now).status == "not_due"
    assert rounds.close(1, SecAggPhase.ADVERTISE, 1, "deadline", now=d.now).status == "not_due"
    assert rounds.close(1, SecAggPhase.ADVERTISE, 7, "deadline", now=d.now + 100).status == "stale"
    reply, result = d.close(False)
    assert reply.status == "aborted" and result is None
    assert "fewer than the threshold 3" in rounds.state(1).reason
    last = EventLog(any_redis, "fed").read()[-1]
    assert last.type is EventType.SECAGG_PHASE and last.get("phase") == "aborted"
    assert d.send("c2", SecAggPhase.ADVERTISE, {}).status == "stale"
    assert rounds.open(1, d.p.cohort, 3, PHASE_S).status == "exists"


@pytest.mark.services
def test_a_client_reads_only_its_own_deliveries(tmp_path):
    from tests.services import REDIS_CONF, RedisServer
    from tests.state.support import make_state
    from tests.state.test_acl import ACL_FILE, PASSWORDS

    acl = tmp_path / "users.acl"
    shutil.copy(ACL_FILE, acl)
    server = RedisServer(
        tmp_path / "redis",
        args=("--aclfile", str(acl)),
        username="operator",
        password=PASSWORDS["operator"],
        config=REDIS_CONF,
    ).start()
    try:
        op = server.client()
        make_state(op, name="fed", quorum=1)  # a federation to register clients in
        registry = ClientRegistry(op, "fed")
        secrets = {f"c{i}": registry.add(f"c{i}") for i in range(5)}
        for c, s in secrets.items():
            Acl(op).grant("fed", c, s)
        d = Driver(op, n=5, secrets=secrets)
        for phase in (SecAggPhase.ADVERTISE, SecAggPhase.SHARE):
            for c in d.p.cohort:
                d.send(c, phase, d.payload(c, phase))
            assert d.close(True)[0].status == "ok"
        keys = FederationKeys("fed")
        c0 = redis_lib.Redis(port=server.port, username="client:fed:c0", password=secrets["c0"], decode_responses=True)
        mine = c0.hgetall(keys.secagg_to(1, "c0"))
        assert {f for f in mine if f.startswith("share:")} == {"share:c1", "share:c2", "share:c3", "share:c4"}
        assert c0.hget(keys.secagg(1), "phase") == "masked_input"  # the public phase state
        for other in (keys.secagg_to(1, "c1"), keys.secagg_phase(1, "share"), keys.secagg_members(1, "share")):
            with pytest.raises(redis_lib.exceptions.NoPermissionError):
                c0.hgetall(other) if "members" not in other else c0.smembers(other)
    finally:
        server.stop()


def _dump(redis) -> bytes:
    """Every key's contents, as bytes: all a worker (whose ACL user reads every key) can read from Redis."""
    out = bytearray()
    for key in sorted(redis.scan_iter("*")):
        kind = redis.type(key)
        if kind == "hash":
            items = sorted(redis.hgetall(key).items())
            out += "".join(f + v for f, v in items).encode()
        elif kind == "set":
            out += "".join(sorted(redis.smembers(key))).encode()
        elif kind == "stream":
            out += "".join(json.dumps(fields) for _, fields in redis.xrange(key)).encode()
        elif kind == "string":
            out += redis.get(key).encode()
    return bytes(out)


def test_nothing_a_worker_reads_in_redis_or_the_store_correlates_with_an_input(any_redis):
    from .test_privacy import as_signed, partial_corr

    d = Driver(any_redis, n=10, length=1 << 18)  # 0.01 is then 5 sd of a null correlation: ~100 comparisons stay quiet
    result = d.run({"masked_input": ["c3"]})
    assert "c3" not in result.summed
    published = result.total
    stream = np.frombuffer(_dump(any_redis), dtype=np.uint8).astype(np.float64)
    assert stream.size > 20_000
    objects = {key: as_signed(np.frombuffer(raw, dtype=U64)) for key, raw in d.store.items()}
    assert len(objects) == 9
    for c in d.p.cohort:
        x = d.xs[c].astype(np.float64)
        for key, view in objects.items():
            assert abs(partial_corr(view, x, published)) <= 0.01, (c, key)
        n = min(stream.size, x.size)
        assert abs(partial_corr(stream[:n], x[:n], published[:n])) <= 3.6 / np.sqrt(n), c
