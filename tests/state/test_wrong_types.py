"""A key of the wrong type (planted, or left by a bug) is a clear error and never a half-done transition."""

from __future__ import annotations

import pytest

from chorus_mq.errors import StateCorrupt
from chorus_mq.state import EventLog, FederationConfig, FederationKeys, RoundState

from .support import Decl, make_state, record, sha_of

K = FederationKeys("fed")


def _dump(redis) -> dict[str, object]:
    """Every key with its type and content."""
    out: dict[str, object] = {}
    for key in sorted(redis.keys("*")):
        kind = redis.type(key)
        if kind == "hash":
            out[key] = ("hash", redis.hgetall(key))
        elif kind == "zset":
            out[key] = ("zset", redis.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            out[key] = ("stream", redis.xrange(key))
        elif kind == "set":
            out[key] = ("set", sorted(redis.smembers(key)))
        elif kind == "list":
            out[key] = ("list", redis.lrange(key, 0, -1))
        else:
            out[key] = (kind, redis.get(key))
    return out


def _open(state):
    return None


def _one_delta(state):
    state.register("fed", 1, record("a"), now=1001.0)


def _aggregating(state):
    state.register("fed", 1, record("a"), now=1001.0)
    state.register("fed", 1, record("b"), now=1001.0)


MANIFEST = sha_of("m")
CASES = {
    "register/deltas": (_open, K.deltas(1), lambda s: s.register("fed", 1, record("a"), now=1001.0)),
    "register/events": (_open, K.events, lambda s: s.register("fed", 1, record("a"), now=1001.0)),
    "register-fires/leases": (_open, K.leases, lambda s: s.register("fed", 1, record("a"), now=1001.0)),
    "close/next-round": (_open, K.round(2), lambda s: s.close("fed", 1, "deadline", now=5000.0)),
    "close/clients": (_open, K.clients, lambda s: s.close("fed", 1, "deadline", now=5000.0)),
    "finalize/next-round": (_aggregating, K.round(2), lambda s: s.finalize("fed", 1, 1, "k", MANIFEST)),
    "finalize/leases": (_aggregating, K.leases, lambda s: s.finalize("fed", 1, 1, "k", MANIFEST)),
    "fail/deadlines": (_aggregating, K.deadlines, lambda s: s.fail("fed", 1, 1, "x")),
    "reclaim/leases": (_aggregating, K.leases, lambda s: s.reclaim("fed", 1, now=9000.0)),
    "redispatch/plan": (_aggregating, K.plan(1), lambda s: s.redispatch("fed", 1, now=9000.0)),
    "redispatch/shards": (_aggregating, K.shards(1), lambda s: s.redispatch("fed", 1, now=9000.0)),
    "close/secrets": (_open, K.secrets, lambda s: s.close("fed", 1, "deadline", now=5000.0)),
    "collect/cursor": (_aggregating, K.collected, lambda s: s.collect_round_work("fed")),
    "renew/leases": (_aggregating, K.leases, lambda s: s.renew("fed", 1, 1, now=1050.0)),
    "extend/leases": (_aggregating, K.leases, lambda s: s.extend_lease("fed", 1, now=9000.0)),
    "evict/deltas": (_one_delta, K.deltas(1), lambda s: s.evict("fed", 1, "a", "x")),
    "abort/events": (_aggregating, K.events, lambda s: s.abort("fed", 1, "x")),
    "shard/shards": (_aggregating, K.shards(1), lambda s: s.shard_done("fed", 1, 0, 2, "{}", epoch=1)),
    "plan/plan": (_aggregating, K.plan(1), lambda s: s.set_plan("fed", 1, "{}")),
    "snapshot/snapshots": (_aggregating, K.snapshots, lambda s: s.snapshots("fed")),
    "due/deadlines": (_open, K.deadlines, lambda s: s.due("fed", now=5000.0)),
    "emit/events": (_open, K.events, lambda s: EventLog(s.redis, "fed").emit("round_opened", 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_wrong_typed_key_changes_nothing(any_redis, case):
    setup, key, transition = CASES[case]
    state = make_state(any_redis, quorum=2, round_timeout=60)
    setup(state)
    any_redis.delete(key)
    any_redis.rpush(key, "planted")  # a list: no key of ours is one
    before = _dump(any_redis)
    with pytest.raises(StateCorrupt, match=key.replace("{", r"\{").replace("}", r"\}")):
        transition(state)
    assert _dump(any_redis) == before


def test_create_over_a_planted_key_creates_nothing(any_redis):
    any_redis.set(K.inbox, "planted")
    with pytest.raises(StateCorrupt, match="inbox"):
        RoundState(any_redis).create_federation(FederationConfig(name="fed", base_model="m", quorum=1), Decl())
    assert any_redis.keys("*") == [K.inbox]


def test_one_corrupt_federation_leaves_the_others_working(any_redis):
    state = make_state(any_redis, name="bad", quorum=1, round_timeout=10)
    make_state(any_redis, name="good", quorum=1, round_timeout=10)
    any_redis.delete(FederationKeys("bad").leases)
    any_redis.set(FederationKeys("bad").leases, "planted")
    with pytest.raises(StateCorrupt):
        state.due("bad", now=5000.0)
    assert state.due("good", now=5000.0) == ([1], [])
    assert state.close("good", 1, "deadline", now=5000.0).status == "extended"
