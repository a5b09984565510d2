"""The round scripts, on fakeredis and on a real redis-server."""

from __future__ import annotations

import threading

import pytest

from chorus_mq.errors import ConfigError, FederationExists, UnknownFederation, UnknownRound
from chorus_mq.state import EventLog, FederationConfig, RoundState

SHAPES = {"m.q": (8, 4), "m.v": (8, 4)}


def _state(redis, **cfg) -> RoundState:
    state = RoundState(redis, lease_s=100)
    state.create_federation(FederationConfig(name="fed", base_model="tiny", quorum=cfg.pop("quorum", 3), **cfg),
                            now=1000.0)
    return state


def _register(state, client, sha=None, r=1, shapes=SHAPES, now=1001.0):
    return state.register("fed", r, client=client, sha256=sha or client * 4, record={"c": client},
                          upload_id=f"up-{client}-{sha}", shapes=shapes, now=now)


def _types(redis):
    return [e["type"] for _, e in EventLog(redis, "fed").read()]


def test_create_is_unique_and_opens_round_one(any_redis):
    state = _state(any_redis)
    with pytest.raises(FederationExists):
        state.create_federation(FederationConfig(name="fed", base_model="x", quorum=1))
    assert state.round("fed", 1)["state"] == "open"
    assert state.federations() == ["fed"]
    assert _types(any_redis) == ["federation_created", "round_opened"]


def test_unknown_federation_and_round(any_redis):
    state = _state(any_redis)
    with pytest.raises(UnknownFederation):
        state.meta("nope")
    with pytest.raises(UnknownRound):
        state.round("fed", 7)


@pytest.mark.parametrize("bad", [dict(quorum=0), dict(quorum=2, min_quorum=3), dict(quorum=1, strategy="mean"),
                                 dict(quorum=1, name="../x")])
def test_config_validation(bad):
    kw = dict(name="fed", base_model="m") | bad
    with pytest.raises(ConfigError):
        FederationConfig(**kw)


def test_register_duplicate_conflict_and_quorum_fires_once(any_redis):
    state = _state(any_redis)
    assert _register(state, "a").status == "accepted"
    dup = _register(state, "a")
    assert (dup.status, dup.n) == ("duplicate", 1)
    assert _register(state, "a", sha="other").status == "conflict"
    assert _register(state, "b").status == "accepted"
    fired = _register(state, "c")
    assert (fired.status, fired.n, fired.epoch) == ("fired", 3, 1)
    assert _register(state, "d").status == "closed"
    assert _register(state, "c").status == "duplicate"  # a redelivered message after the quorum is a no-op
    assert state.round("fed", 1)["state"] == "aggregating"
    assert sorted(state.deltas("fed", 1)) == ["a", "b", "c"]
    assert _types(any_redis).count("round_aggregating") == 1


def test_shape_mismatch_is_refused_and_changes_nothing(any_redis):
    state = _state(any_redis)
    _register(state, "a")
    res = _register(state, "b", shapes={"m.q": (8, 5)})
    assert res.status == "shape_mismatch" and "m.q" in res.detail
    assert state.round("fed", 1)["n"] == 1
    assert _register(state, "b", shapes={"m.q": (8, 4), "m.k": (2, 4)}).status == "accepted"


def test_quorum_fires_exactly_once_under_concurrency(real_redis):
    state = _state(real_redis, quorum=10)
    results = []
    lock = threading.Lock()

    def go(i):
        res = RoundState(real_redis.__class__.from_url(_url(real_redis), decode_responses=True), lease_s=100).register(
            "fed", 1, client=f"c{i}", sha256=f"{i:064x}", record={}, upload_id=f"u{i}", shapes=SHAPES)
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


def _url(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_finalize_is_fenced_by_epoch_and_opens_next_round(any_redis):
    state = _state(any_redis, quorum=1)
    fired = _register(state, "a")
    reclaimed = state.reclaim("fed", 1, now=2000.0)  # lease (100 s) ran out: a new epoch takes over
    assert reclaimed.status == "reclaimed" and reclaimed.epoch == fired.epoch + 1
    assert state.finalize("fed", 1, fired.epoch, "k", {}).status == "stale"
    assert state.finalize("fed", 1, reclaimed.epoch, "k", {"manifest_sha256": "ab"}).status == "ok"
    assert state.finalize("fed", 1, reclaimed.epoch, "k", {}).status == "already"
    assert state.round("fed", 1)["state"] == "complete"
    assert state.round("fed", 2)["state"] == "open"
    assert state.current_round("fed") == 2
    assert _types(any_redis).count("round_complete") == 1


def test_fail_moves_on_instead_of_wedging(any_redis):
    state = _state(any_redis, quorum=1)
    fired = _register(state, "a")
    assert state.fail("fed", 1, fired.epoch, "bad").status == "ok"
    assert state.round("fed", 1)["state"] == "failed"
    assert state.round("fed", 2)["state"] == "open"
    assert state.fail("fed", 1, fired.epoch, "bad").status == "bad_state"


def test_reclaim_not_due_and_noop(any_redis):
    state = _state(any_redis, quorum=1)
    _register(state, "a", now=1001.0)
    assert state.reclaim("fed", 1, now=1050.0).status == "not_due"
    assert state.reclaim("fed", 2, now=5000.0).status == "noop"


def test_deadline_close_with_min_quorum(any_redis):
    state = _state(any_redis, quorum=5, min_quorum=2, round_timeout=60)
    _register(state, "a")
    assert state.due("fed", now=1030.0) == ([], [])
    assert state.close("fed", 1, "deadline", now=1030.0).status == "not_due"
    ext = state.close("fed", 1, "deadline", now=1061.0)  # one delta < min-quorum: extend (default policy)
    assert ext.status == "extended"
    assert state.round("fed", 1)["deadline"] == pytest.approx(1121.0)
    _register(state, "b")
    assert state.due("fed", now=1122.0) == ([1], [])
    fired = state.close("fed", 1, "deadline", now=1122.0)
    assert (fired.status, fired.n) == ("fired", 2)
    again = state.close("fed", 1, "deadline", now=1122.0)  # a second sweep at once
    assert again.status == "noop"
    assert _types(any_redis).count("round_aggregating") == 1


def test_deadline_expire_policy_opens_next_round(any_redis):
    state = _state(any_redis, quorum=5, min_quorum=2, round_timeout=60, expire_policy="expire")
    _register(state, "a")
    assert state.close("fed", 1, "deadline", now=1061.0).status == "expired"
    assert state.round("fed", 1)["state"] == "expired"
    assert state.round("fed", 2)["state"] == "open"


def test_manual_close_needs_min_quorum(any_redis):
    state = _state(any_redis, quorum=5, min_quorum=2)
    _register(state, "a")
    t = state.close("fed", 1, "manual")
    assert (t.status, t.n, t.detail) == ("too_few", 1, "2")
    _register(state, "b")
    assert state.close("fed", 1, "manual").status == "fired"


def test_min_quorum_zero_means_full_quorum(any_redis):
    state = _state(any_redis, quorum=3, round_timeout=10, expire_policy="expire")
    _register(state, "a")
    _register(state, "b")
    assert state.close("fed", 1, "deadline", now=1011.0).status == "expired"
