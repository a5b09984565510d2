"""The round scripts, on fakeredis and on a real redis-server."""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib

from chorus_mq.errors import ConfigError, FederationExists, StateCorrupt, UnknownFederation, UnknownRound
from chorus_mq.names import INBOX_GROUP, CloseReason, RoundStatus
from chorus_mq.state import EventLog, FederationConfig, FederationKeys, ManifestRef, RoundState, SnapshotRecord

from .support import MODULES, Decl, make_state, record, sha_of, url_of

MANIFEST_SHA = sha_of("manifest")


def _register(state, client, sha=None, r=1, now=1001.0):
    return state.register("fed", r, record(client, sha), now=now)


def _types(redis):
    return [e.type for e in EventLog(redis, "fed").read()]


def test_create_is_unique_and_opens_round_one(any_redis):
    state = make_state(any_redis)
    with pytest.raises(FederationExists):
        state.create_federation(FederationConfig(name="fed", base_model="x", quorum=1), Decl())
    assert state.round("fed", 1).state == "open"
    assert state.federations() == ["fed"]
    assert _types(any_redis) == ["federation_created", "round_opened"]


def test_create_again_with_the_same_config_is_a_no_op(any_redis):
    state = make_state(any_redis, quorum=2)
    again = state.create_federation(FederationConfig(name="fed", base_model="tiny", quorum=2), Decl(), now=5000.0)
    assert again.status == "exists"
    assert _types(any_redis) == ["federation_created", "round_opened"]
    assert state.round("fed", 1).opened_at == 1000.0
    with pytest.raises(FederationExists):  # same config, another model
        state.create_federation(
            FederationConfig(name="fed", base_model="tiny", quorum=2), Decl(modules={"base_model.model.x": (2, 2)})
        )


def test_create_stores_model_inbox_group_seed_and_noise_key(any_redis):
    extras = {"base_model.model.score.weight": (2, 8)}
    state = RoundState(any_redis)
    state.create_federation(
        FederationConfig(name="fed", base_model="tiny", quorum=1), Decl(extras=extras), seed="secret-seed", now=1000.0
    )
    assert state.modules("fed") == MODULES
    assert state.extras("fed") == extras
    # the draw's seed is a secret: in the workers-only secrets hash, nowhere a client may read
    assert "selection_seed" not in state.meta("fed")
    assert state.selection_seed("fed") == "secret-seed"
    assert any_redis.hget(FederationKeys("fed").secrets, "selection_seed") == "secret-seed"
    assert len(state.noise_key("fed")) == 64
    groups = any_redis.xinfo_groups(FederationKeys("fed").inbox)
    assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(INBOX_GROUP, "0-0")]
    assert state.latest_complete("fed") is None  # nothing complete yet
    with pytest.raises(UnknownRound):  # no initial adapter: no round 0
        state.round("fed", 0)


def test_create_with_an_initial_adapter_makes_round_zero_complete(any_redis):
    state = RoundState(any_redis)
    initial = ManifestRef("fed/rounds/000000/manifest.json", MANIFEST_SHA)
    state.create_federation(
        FederationConfig(name="fed", base_model="tiny", quorum=1), Decl(), initial=initial, now=1000.0
    )
    zero = state.round("fed", 0)
    assert (zero.state, zero.manifest, zero.manifest_sha256) == ("complete", initial.key, MANIFEST_SHA)
    assert state.latest_complete("fed") == 0 and state.current_round("fed") == 1
    assert [r.round for r in state.rounds("fed")] == [1]


@pytest.mark.parametrize(
    "decl",
    [
        Decl(modules={}),
        Decl(modules={"m": (0, 4)}),
        Decl(modules={"m": (4,)}),
        Decl(modules={"bad name": (2, 2)}),
        Decl(extras={"h": (2, -1)}),
    ],
)
def test_create_refuses_a_bad_model_declaration_and_writes_nothing(any_redis, decl):
    with pytest.raises(ConfigError):
        RoundState(any_redis).create_federation(FederationConfig(name="fed", base_model="m", quorum=1), decl)
    assert any_redis.keys("*") == []


def test_unknown_federation_and_round(any_redis):
    state = make_state(any_redis)
    with pytest.raises(UnknownFederation):
        state.meta("nope")
    with pytest.raises(UnknownRound):
        state.round("fed", 7)


def test_register_duplicate_conflict_and_quorum_fires_once(any_redis):
    state = make_state(any_redis)
    assert _register(state, "a").status == "accepted"
    dup = _register(state, "a")
    assert (dup.status, dup.n) == ("duplicate", 1)
    other = sha_of("other")
    conflict = _register(state, "a", sha=other)
    assert (conflict.status, conflict.detail) == ("conflict", sha_of("a"))
    assert _register(state, "b").status == "accepted"
    fired = _register(state, "c")
    assert (fired.status, fired.n, fired.epoch) == ("fired", 3, 1)
    assert _register(state, "d").status == "closed"
    assert _register(state, "c").status == "duplicate"  # a redelivered message after the quorum is a no-op
    info = state.round("fed", 1)
    assert (info.state, info.closed_by, info.lease_until) == ("aggregating", CloseReason.QUORUM, 1101.0)
    assert info.clients == ["a", "b", "c"]
    deltas = state.deltas("fed", 1)
    assert sorted(deltas) == ["a", "b", "c"]
    assert deltas["b"] == record("b")  # the record round-trips whole
    assert _types(any_redis).count("round_aggregating") == 1
    assert state.register("fed", 9, record("a")).status == "no_round"


@pytest.mark.services
def test_quorum_fires_exactly_once_under_concurrency(real_redis):
    state = make_state(real_redis, quorum=10)
    results = []
    lock = threading.Lock()

    def go(i):
        own = RoundState(redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True), lease_s=100)
        res = own.register("fed", 1, record(f"c{i}", f"{i:064x}"))
        with lock:
            results.append(res.status)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("fired") == 1
    assert results.count("accepted") == 9
    assert results.count("closed") == 40
    assert len(state.deltas("fed", 1)) == 10


def test_finalize_is_fenced_by_epoch_and_opens_next_round(any_redis):
    state = make_state(any_redis, quorum=1)
    fired = _register(state, "a")
    reclaimed = state.reclaim("fed", 1, now=2000.0)  # lease (100 s) ran out: a new epoch takes over
    assert reclaimed.status == "reclaimed" and reclaimed.epoch == fired.epoch + 1
    assert state.finalize("fed", 1, fired.epoch, "k", MANIFEST_SHA).status == "stale"
    done = state.finalize("fed", 1, reclaimed.epoch, "k", MANIFEST_SHA, summary={"residual_bytes": 7})
    assert (done.status, done.epoch) == ("ok", reclaimed.epoch)
    assert state.finalize("fed", 1, reclaimed.epoch, "k", MANIFEST_SHA).status == "already"
    info = state.round("fed", 1)
    assert (info.state, info.manifest, info.manifest_sha256, info.reclaims) == ("complete", "k", MANIFEST_SHA, 1)
    assert state.round("fed", 2).state == "open"
    assert state.current_round("fed") == 2 and state.latest_complete("fed") == 1
    complete = [e for e in EventLog(any_redis, "fed").read() if e.type == "round_complete"]
    assert len(complete) == 1
    assert (complete[0].get("residual_bytes"), complete[0].get("manifest_sha256")) == (7, MANIFEST_SHA)
    with pytest.raises(ConfigError):
        state.finalize("fed", 2, 1, "k", "not-a-sha")


def test_fail_moves_on_instead_of_wedging(any_redis):
    state = make_state(any_redis, quorum=1)
    fired = _register(state, "a")
    assert state.fail("fed", 1, fired.epoch + 1, "bad").status == "stale"
    assert state.fail("fed", 1, fired.epoch, "bad").status == "ok"
    info = state.round("fed", 1)
    assert (info.state, info.reason) == ("failed", "bad")
    assert state.round("fed", 2).state == "open"
    assert state.fail("fed", 1, fired.epoch, "bad").status == "bad_state"


def test_reclaim_not_due_and_noop(any_redis):
    state = make_state(any_redis, quorum=1)
    _register(state, "a", now=1001.0)
    assert state.reclaim("fed", 1, now=1050.0).status == "not_due"
    assert state.reclaim("fed", 2, now=5000.0).status == "noop"


def test_redispatch_resends_under_the_same_epoch_until_a_resend_makes_no_progress(any_redis):
    """A lost task message costs a lease period, not an attempt: the epoch and reclaims stay as they are
    while each re-send makes progress (plan stored, shards recorded); a re-send that went nowhere is stuck."""
    state = make_state(any_redis, quorum=1)  # lease 100 s
    fired = _register(state, "a", now=1001.0)  # lease until 1101
    assert state.redispatch("fed", 1, now=1050.0).status == "not_due"
    first = state.redispatch("fed", 1, now=1102.0)  # the round task's message was lost
    assert (first.status, first.epoch, first.detail) == ("resend", fired.epoch, "0")
    assert state.due("fed", now=1150.0) == ([], [])  # the lease runs another period
    assert state.redispatch("fed", 1, now=1150.0).status == "not_due"  # a second sweep meanwhile
    state.set_plan("fed", 1, '{"shards": [[0, 1], [1, 2]]}')  # the re-sent round task planned...
    state.shard_done("fed", 1, 0, 2, "{}", epoch=fired.epoch)  # ...and one shard ran; the other was lost
    again = state.redispatch("fed", 1, now=1203.0)
    assert (again.status, again.epoch, again.detail) == ("resend", fired.epoch, "2")
    stuck = state.redispatch("fed", 1, now=1304.0)  # that re-send went nowhere
    assert (stuck.status, stuck.epoch) == ("stuck", fired.epoch)
    assert state.redispatch("fed", 1, now=1305.0).status == "stuck"  # and stays so (the caller reclaims)
    info = state.round("fed", 1)
    assert (info.epoch, info.reclaims, info.resends, info.lease_until) == (fired.epoch, 0, 2, 1303.0)
    reclaimed = state.reclaim("fed", 1, now=1306.0)
    assert state.redispatch("fed", 1, now=1407.0).status == "resend"  # a new epoch gets its own re-send
    assert state.round("fed", 1).epoch == reclaimed.epoch
    assert state.finalize("fed", 1, reclaimed.epoch, "k", MANIFEST_SHA).status == "ok"
    assert state.redispatch("fed", 1, now=1500.0).status == "noop"
    assert state.due("fed", now=5000.0) == ([], [])


def test_collect_round_work_drops_the_plan_and_shards_of_ended_rounds_only(any_redis):
    """A commit killed between finalize and its clean-up (and a failed round) leave plan and shard keys:
    the sweep's collection drops them for every round before the current one, idempotently."""
    state = make_state(any_redis, quorum=1)
    k = FederationKeys("fed")
    fired = _register(state, "a")
    state.set_plan("fed", 1, "{}")
    state.shard_done("fed", 1, 0, 1, "{}", epoch=fired.epoch)
    state.finalize("fed", 1, fired.epoch, "k", MANIFEST_SHA)  # and died before forget_round_work
    fired = _register(state, "a", r=2)
    state.set_plan("fed", 2, "{}")
    assert state.fail("fed", 2, fired.epoch, "shard failed").status == "ok"
    fired = _register(state, "a", r=3)  # round 3 aggregates now: its work stays
    state.set_plan("fed", 3, "{}")
    state.shard_done("fed", 3, 0, 2, "{}", epoch=fired.epoch)
    assert state.collect_round_work("fed") == [1, 2]
    assert not any_redis.exists(k.plan(1), k.shards(1), k.plan(2), k.shards(2))
    assert state.plan("fed", 3) == "{}" and list(state.shards("fed", 3)) == [0]
    assert state.round("fed", 1).state == "complete" and state.deltas("fed", 1)  # nothing else touched
    assert state.collect_round_work("fed") == []  # twice: nothing to do, nothing looked at again
    any_redis.delete(k.collected)  # a lost cursor only repeats the DELs
    assert state.collect_round_work("fed") == [1, 2]
    assert state.plan("fed", 3) == "{}"


def test_evict_revoked_evicts_from_the_open_round_and_keeps_an_aggregating_one(any_redis):
    state = make_state(any_redis, quorum=2)
    _register(state, "a")
    gone = state.evict_revoked("fed", "a")
    assert (gone.round, gone.outcome, gone.sha256, gone.n) == (1, "evicted", sha_of("a"), 0)
    assert state.round("fed", 1).evicted == {"a": sha_of("a")} and state.deltas("fed", 1) == {}
    assert state.evict_revoked("fed", "a").outcome == "none"
    _register(state, "b")
    assert _register(state, "c").status == "fired"
    kept = state.evict_revoked("fed", "c")
    assert (kept.round, kept.outcome, kept.sha256) == (1, "kept", sha_of("c"))
    assert sorted(state.deltas("fed", 1)) == ["b", "c"]  # the aggregation goes on with it
    assert [e.get("client") for e in EventLog(any_redis, "fed").read() if e.type == "delta_evicted"] == ["a"]


def test_renew_pushes_the_lease_for_the_current_epoch_only(any_redis):
    state = make_state(any_redis, quorum=1)
    fired = _register(state, "a", now=1001.0)  # lease until 1101
    assert state.renew("fed", 1, fired.epoch, now=1050.0) is True
    assert state.round("fed", 1).lease_until == 1150.0
    assert state.due("fed", now=1120.0) == ([], [])
    assert state.renew("fed", 1, fired.epoch, now=1010.0) is True  # never shortens it
    assert state.round("fed", 1).lease_until == 1150.0
    assert state.renew("fed", 1, fired.epoch + 1, now=1060.0) is False  # a future epoch: not the holder
    reclaimed = state.reclaim("fed", 1, now=1200.0)
    assert state.renew("fed", 1, fired.epoch, now=1201.0) is False  # the old run was reclaimed: it must stop
    assert state.renew("fed", 1, reclaimed.epoch, now=1250.0) is True
    assert state.renew("fed", 2, 0, now=1250.0) is False  # open, not aggregating


def test_extend_lease_keeps_the_epoch(any_redis):
    state = make_state(any_redis, quorum=1)
    fired = _register(state, "a", now=1001.0)
    assert state.due("fed", now=1200.0) == ([], [1])
    ext = state.extend_lease("fed", 1, now=1200.0)
    assert (ext.status, ext.epoch) == ("extended", fired.epoch)
    info = state.round("fed", 1)
    assert (info.epoch, info.lease_until, info.lease_extensions) == (fired.epoch, 1300.0, 1)
    assert state.due("fed", now=1250.0) == ([], [])
    assert state.finalize("fed", 1, fired.epoch, "k", MANIFEST_SHA).status == "ok"
    assert state.extend_lease("fed", 1, now=1400.0).status == "noop"
    assert state.due("fed", now=5000.0) == ([], [])


def test_evict_removes_one_delta_and_it_cannot_come_back(any_redis):
    state = make_state(any_redis, quorum=3)
    _register(state, "a")
    _register(state, "b")
    ev = state.evict("fed", 1, "a", "poisoned q_proj")
    assert (ev.status, ev.n, ev.detail) == ("evicted", 1, sha_of("a"))
    info = state.round("fed", 1)
    assert (info.n, info.clients, dict(info.evicted)) == (1, ["b"], {"a": sha_of("a")})
    assert sorted(state.deltas("fed", 1)) == ["b"]
    event = EventLog(any_redis, "fed").read()[-1]
    assert (event.type, event.get("client"), event.get("reason"), event.get("n")) == (
        "delta_evicted",
        "a",
        "poisoned q_proj",
        1,
    )
    assert _register(state, "a").status == "evicted"  # a redelivery of the evicted delta stays out
    assert state.evict("fed", 1, "a", "again").status == "noop"
    assert _register(state, "a", sha=sha_of("fixed")).status == "accepted"  # another delta may come
    assert state.evict("fed", 7, "a", "x").status == "no_round"
    _register(state, "c")  # fires
    assert state.evict("fed", 1, "c", "too late").status == "closed"


@pytest.mark.parametrize("aggregating", [False, True])
def test_abort_fences_the_round_and_opens_the_next(any_redis, aggregating):
    state = make_state(any_redis, quorum=2, round_timeout=60)
    _register(state, "a")
    epoch = _register(state, "b").epoch if aggregating else 0
    aborted = state.abort("fed", 1, "operator: wrong base model", now=1010.0)
    assert (aborted.status, aborted.epoch) == ("aborted", epoch + 1)
    info = state.round("fed", 1)
    assert (info.state, info.reason, info.aborted_at) == ("aborted", "operator: wrong base model", 1010.0)
    assert state.round("fed", 2).state == "open" and state.current_round("fed") == 2
    assert state.due("fed", now=1069.0) == ([], [])  # round 1's deadline and lease are gone
    assert state.due("fed", now=1071.0) == ([2], [])
    if aggregating:
        assert state.finalize("fed", 1, epoch, "k", MANIFEST_SHA).status == "bad_state"
    event = next(e for e in EventLog(any_redis, "fed").read() if e.type == "round_aborted")
    assert (event.round, event.get("reason"), event.terminal) == (1, "operator: wrong base model", True)
    assert state.abort("fed", 1, "again").status == "bad_state"
    assert state.abort("fed", 9, "x").status == "no_round"


def test_shard_done_counts_each_shard_once_and_one_caller_is_last(any_redis):
    state = make_state(any_redis, quorum=1)
    assert state.shard_done("fed", 1, 0, 3, "{}", epoch=0).status == "stale"  # still open
    epoch = _register(state, "a").epoch
    first = state.shard_done("fed", 1, 2, 3, '{"k": 2}', epoch=epoch)
    assert (first.status, first.n, first.detail) == ("recorded", 1, "")
    assert state.shard_done("fed", 1, 2, 3, '{"k": "again"}', epoch=epoch).status == "duplicate"
    assert state.shard_done("fed", 1, 0, 4, "{}", epoch=epoch).status == "conflict"  # another split
    assert state.shard_done("fed", 1, 0, 3, '{"k": 0}', epoch=epoch).detail == ""
    last = state.shard_done("fed", 1, 1, 3, '{"k": 1}', epoch=epoch)
    assert (last.status, last.n, last.detail) == ("recorded", 3, "last")
    assert state.shard_done("fed", 1, 1, 3, "{}", epoch=epoch).detail == ""
    assert state.shards("fed", 1) == {0: '{"k": 0}', 1: '{"k": 1}', 2: '{"k": 2}'}
    assert state.round("fed", 1).shards == 3
    done = [
        (e.get("shard"), e.get("done"), e.get("total"))
        for e in EventLog(any_redis, "fed").read()
        if e.type == "shard_done"
    ]
    assert done == [(2, 1, 3), (0, 2, 3), (1, 3, 3)]
    with pytest.raises(ConfigError):
        state.shard_done("fed", 1, 3, 3, "{}", epoch=epoch)


def test_a_shard_done_under_a_stale_epoch_is_ignored(any_redis):
    """A run the sweep reclaimed (epoch 1, the round now under 2) cannot record, nor complete the set."""
    state = make_state(any_redis, quorum=1, lease_s=100)
    old = _register(state, "a").epoch
    assert state.reclaim("fed", 1, now=1001.0 + 101).status == "reclaimed"
    new = state.round("fed", 1).epoch
    assert new == old + 1
    for k in (0, 1):
        stale = state.shard_done("fed", 1, k, 2, f'{{"old": {k}}}', epoch=old)
        assert (stale.status, stale.detail, stale.epoch) == ("stale", "epoch", new)
    assert state.shards("fed", 1) == {} and state.round("fed", 1).shards == 0
    assert state.shard_done("fed", 1, 0, 2, "{}", epoch=new + 1).status == "stale"  # nor a future one
    assert state.shard_done("fed", 1, 0, 2, '{"new": 0}', epoch=new).status == "recorded"
    assert state.shard_done("fed", 1, 1, 2, '{"old": 1}', epoch=old).status == "stale"
    last = state.shard_done("fed", 1, 1, 2, '{"new": 1}', epoch=new)
    assert (last.status, last.detail) == ("recorded", "last")
    assert state.shards("fed", 1) == {0: '{"new": 0}', 1: '{"new": 1}'}
    assert [e.get("shard") for e in EventLog(any_redis, "fed").read() if e.type == "shard_done"] == [0, 1]


@pytest.mark.services
def test_shard_done_has_one_last_among_concurrent_finishers(real_redis):
    state = make_state(real_redis, quorum=1)
    epoch = _register(state, "a").epoch
    total, lasts, lock = 8, [], threading.Lock()

    def finish(k):
        own = RoundState(redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True))
        for _ in range(3):  # each shard also redelivered twice
            reply = own.shard_done("fed", 1, k, total, f'{{"k": {k}}}', epoch=epoch)
            with lock:
                lasts.append((k, reply.status, reply.detail))

    threads = [threading.Thread(target=finish, args=(k,)) for k in range(total)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [entry for entry in lasts if entry[2] == "last"].__len__() == 1
    assert sorted(k for k, status, _ in lasts if status == "recorded") == list(range(total))
    assert len(state.shards("fed", 1)) == total


def test_plan_is_set_once(any_redis):
    state = make_state(any_redis, quorum=1)
    assert state.plan("fed", 1) is None
    assert state.set_plan("fed", 1, '{"clients": ["a"]}') == '{"clients": ["a"]}'
    assert state.set_plan("fed", 1, '{"clients": ["b"]}') == '{"clients": ["a"]}'
    assert state.plan("fed", 1) == '{"clients": ["a"]}'


def test_snapshots_first_record_wins(any_redis):
    state = make_state(any_redis, quorum=1)
    first = SnapshotRecord(
        round=10,
        key="fed/snapshots/000010/cumulative-x.safetensors",
        sha256=sha_of("1"),
        size=100,
        dtype="bfloat16",
        rounds=10,
        created_at=5.0,
    )
    assert state.add_snapshot("fed", first) == first
    other = SnapshotRecord(round=10, key="elsewhere", sha256=sha_of("2"), size=1)
    assert state.add_snapshot("fed", other.to_json()) == first
    later = SnapshotRecord(round=20, key="k20", sha256=sha_of("3"), size=1, base=10, rounds=10)
    state.add_snapshot("fed", later)
    assert state.snapshots("fed") == {10: first, 20: later}
    with pytest.raises(StateCorrupt):
        state.add_snapshot("fed", '{"round": 30}')
    assert list(state.snapshots("fed")) == [10, 20]


def test_compaction_is_requested_once_per_retry_period(any_redis):
    state = make_state(any_redis, quorum=1)
    assert state.request_compaction("fed", 10, retry_s=60) is True
    assert state.request_compaction("fed", 10, retry_s=60) is False
    assert state.request_compaction("fed", 20, retry_s=60) is True
    assert 0 < any_redis.pttl(state.keys("fed").compaction_request(10)) <= 60_000
    assert state.keys("fed") == FederationKeys("fed")


def test_forget_round_work_only_once_the_round_is_complete(any_redis):
    state = make_state(any_redis, quorum=1)
    fired = _register(state, "a")
    state.set_plan("fed", 1, "{}")
    state.shard_done("fed", 1, 0, 1, "{}", epoch=fired.epoch)
    assert state.forget_round_work("fed", 1) is False
    assert state.plan("fed", 1) == "{}"
    state.finalize("fed", 1, fired.epoch, "k", MANIFEST_SHA, {"clients": ["a"]})
    assert state.forget_round_work("fed", 1) is True
    assert (state.plan("fed", 1), state.shards("fed", 1)) == (None, {})
    assert state.round("fed", 1).manifest == "k"  # the round itself stays


def test_rejected_records_are_counted_not_published(any_redis):
    state = make_state(any_redis, quorum=1)
    before = _types(any_redis)
    assert state.count_rejected("fed", "unauthenticated") == 1
    assert state.count_rejected("fed", "unauthenticated") == 2
    state.count_rejected("fed", "too_large")
    assert state.rejected("fed") == {"too_large": 1, "unauthenticated": 2}
    assert _types(any_redis) == before
    with pytest.raises(ConfigError):
        state.count_rejected("fed", "x" * 100)


def test_deadline_close_with_min_quorum(any_redis):
    state = make_state(any_redis, quorum=5, min_quorum=2, round_timeout=60)
    _register(state, "a")
    assert state.due("fed", now=1030.0) == ([], [])
    assert state.close("fed", 1, "deadline", now=1030.0).status == "not_due"
    ext = state.close("fed", 1, "deadline", now=1061.0)  # one delta < min-quorum: extend (default policy)
    assert ext.status == "extended"
    assert state.round("fed", 1).deadline == pytest.approx(1121.0)
    _register(state, "b")
    assert state.due("fed", now=1122.0) == ([1], [])
    fired = state.close("fed", 1, "deadline", now=1122.0)
    assert (fired.status, fired.n) == ("fired", 2)
    assert state.round("fed", 1).closed_by == "deadline"
    again = state.close("fed", 1, "deadline", now=1122.0)  # a second sweep at once
    assert again.status == "noop"
    assert _types(any_redis).count("round_aggregating") == 1


def test_deadline_expire_policy_opens_next_round(any_redis):
    state = make_state(any_redis, quorum=5, min_quorum=2, round_timeout=60, expire_policy="expire")
    _register(state, "a")
    assert state.close("fed", 1, "deadline", now=1061.0).status == "expired"
    assert state.round("fed", 1).state == RoundStatus.EXPIRED
    assert state.round("fed", 2).state == "open"


def test_manual_close_needs_min_quorum(any_redis):
    state = make_state(any_redis, quorum=5, min_quorum=2)
    _register(state, "a")
    t = state.close("fed", 1, "manual")
    assert (t.status, t.n, t.detail) == ("too_few", 1, "2")
    _register(state, "b")
    assert state.close("fed", 1, "manual").status == "fired"
    with pytest.raises(ConfigError):
        state.close("fed", 1, "quorum")


def test_min_quorum_zero_means_full_quorum(any_redis):
    state = make_state(any_redis, quorum=3, round_timeout=10, expire_policy="expire")
    _register(state, "a")
    _register(state, "b")
    assert state.close("fed", 1, "deadline", now=1011.0).status == "expired"


def test_rounds_lists_every_round_typed(any_redis):
    state = make_state(any_redis, quorum=1)
    for r in (1, 2, 3):
        fired = _register(state, "a", r=r)
        state.finalize("fed", r, fired.epoch, f"k{r}", MANIFEST_SHA)
    infos = state.rounds("fed")
    assert [(i.round, i.state) for i in infos] == [(1, "complete"), (2, "complete"), (3, "complete"), (4, "open")]
    assert infos[0].ended and not infos[3].ended
