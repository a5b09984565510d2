"""The client inbox: XADD by clients, a consumer group for workers, claims of what a dead consumer left."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from chorus_mq.errors import ServiceUnavailable, TooLarge
from chorus_mq.names import INBOX_GROUP
from chorus_mq.state import FederationKeys, Inbox, InboxEntry, read_group
from chorus_mq.state.functions import InboxLimits, load_functions

from .support import make_state, url_of


def _inboxes(redis, *pairs):
    boxes = [Inbox(redis, f, c) for f, c in pairs]
    for box in boxes:
        box.ensure_group()
    return boxes


def test_records_reach_one_consumer_each_across_federations_and_clients(any_redis):
    for name in ("fed", "other"):
        make_state(any_redis, name=name)
    boxes = _inboxes(any_redis, ("fed", "alice"), ("other", "alice"), ("fed", "bob"), ("fed", None))
    ids = [
        Inbox(any_redis, "fed", "alice").append('{"n": 1}'),
        Inbox(any_redis, "other", "alice").append('{"n": 2}'),
        Inbox(any_redis, "fed", "bob").append('{"n": 3}'),
        Inbox(any_redis, "fed").append('{"n": 4}'),
    ]
    got = read_group(any_redis, boxes, "pump-1", count=10, block_ms=None)
    assert sorted((e.federation, e.client or "", e.record) for e in got) == [
        ("fed", "", '{"n": 4}'),
        ("fed", "alice", '{"n": 1}'),
        ("fed", "bob", '{"n": 3}'),
        ("other", "alice", '{"n": 2}'),
    ]
    assert sorted(e.id for e in got) == sorted(ids)
    assert read_group(any_redis, boxes, "pump-2", count=10, block_ms=None) == []  # delivered once
    alice = Inbox(any_redis, "fed", "alice")
    assert alice.pending() == 1
    assert alice.ack_delete([e.id for e in got if (e.federation, e.client) == ("fed", "alice")]) == 1
    assert (alice.pending(), alice.length()) == (0, 0)
    assert Inbox(any_redis, "other", "alice").pending() == 1


def test_each_client_has_its_own_stream(any_redis):
    make_state(any_redis)
    keys = FederationKeys("fed")
    assert Inbox(any_redis, "fed", "alice").key == keys.client_inbox("alice") != keys.client_inbox("bob")
    assert Inbox(any_redis, "fed").key == keys.inbox


def test_a_dead_consumers_entries_are_claimed(any_redis):
    make_state(any_redis)
    inbox = _inboxes(any_redis, ("fed", "alice"))[0]
    for i in range(5):
        inbox.append(f'{{"n": {i}}}')
    taken = read_group(any_redis, [inbox], "dies", count=3, block_ms=None)
    assert len(taken) == 3
    assert inbox.claim("survivor", min_idle_ms=60_000, count=10) == []  # not idle long enough
    time.sleep(0.05)
    claimed = inbox.claim("survivor", min_idle_ms=10, count=10)
    assert [e.id for e in claimed] == [e.id for e in taken]
    assert inbox.ack_delete([e.id for e in claimed]) == 3
    rest = read_group(any_redis, [inbox], "survivor", count=10, block_ms=None)
    assert [e.record for e in rest] == ['{"n": 3}', '{"n": 4}']
    assert inbox.ack_delete([]) == 0


def test_an_entry_that_is_not_one_record_is_delivered_as_none(any_redis):
    make_state(any_redis)
    box = _inboxes(any_redis, ("fed", "alice"))[0]
    junk = [any_redis.xadd(box.key, {"junk": "x" * 100}), any_redis.xadd(box.key, {"m": "{}", "task": "celery.x"})]
    got = read_group(any_redis, [box], "pump", count=10, block_ms=None)
    assert got == [InboxEntry("fed", entry_id, None, "alice") for entry_id in junk]
    federation, entry_id, record, client = got[0]  # a typed tuple
    assert (federation, entry_id, record, client) == ("fed", junk[0], None, "alice")


def test_group_is_created_where_missing(any_redis):
    inbox = Inbox(any_redis, "legacy", "alice")  # a client added while the pump was reading: no group yet
    assert inbox.pending() == 0
    got = read_group(any_redis, [inbox], "pump", count=10, block_ms=None)
    assert got == []
    assert inbox.ensure_group() is False  # read_group made it
    inbox.append("{}")
    assert [e.record for e in read_group(any_redis, [inbox], "pump", count=10, block_ms=None)] == ["{}"]
    groups = any_redis.xinfo_groups(inbox.key)
    assert [g["name"] for g in groups] == [INBOX_GROUP]


def test_inbox_is_bounded_by_the_append_function(any_redis):
    make_state(any_redis)
    limits = InboxLimits(max_record_bytes=100, max_records=10)
    load_functions(any_redis, limits)
    try:
        inbox = Inbox(any_redis, "fed", "alice")
        with pytest.raises(TooLarge, match="101 bytes; at most 100"):
            inbox.append("x" * 101)
        ids = [inbox.append("x" * 100) for _ in range(10)]
        with pytest.raises(ServiceUnavailable, match="holds 10 records"):
            inbox.append("{}")
        assert inbox.length() == 10 and len(set(ids)) == 10
        inbox.ack_delete(ids[:3])  # the workers handled three: three more fit
        for _ in range(3):
            inbox.append("{}")
        with pytest.raises(ServiceUnavailable):
            inbox.append("{}")
    finally:
        load_functions(any_redis, InboxLimits())  # the server is shared: leave the default limits


def test_append_loads_the_library_where_none_is(any_redis):
    make_state(any_redis)
    any_redis.function_flush()
    assert Inbox(any_redis, "fed", "alice").append("{}")
    assert any_redis.function_list(library="chorus")


@pytest.mark.services
def test_read_group_blocks_until_a_record_arrives(real_redis):
    make_state(real_redis)
    box = _inboxes(real_redis, ("fed", "alice"))[0]
    later = threading.Timer(
        0.3, lambda: Inbox(redis_lib.Redis.from_url(url_of(real_redis)), "fed", "alice").append("{}")
    )
    later.start()
    start = time.monotonic()
    got = read_group(real_redis, [box], "pump", count=10, block_ms=5000)
    later.join()
    assert [e.record for e in got] == ["{}"]
    assert 0.2 < time.monotonic() - start < 4.0
    assert read_group(real_redis, [], "pump", count=1, block_ms=50) == []


@pytest.mark.services
def test_resp3_replies_read_the_same(real_redis):
    make_state(real_redis)
    resp3 = redis_lib.Redis.from_url(url_of(real_redis), decode_responses=True, protocol=3)
    box = _inboxes(resp3, ("fed", "alice"))[0]
    entry_id = box.append('{"n": 1}')
    got = read_group(resp3, [box], "dies", count=10, block_ms=None)
    assert got == [InboxEntry("fed", entry_id, '{"n": 1}', "alice")]
    time.sleep(0.05)
    assert box.claim("survivor", min_idle_ms=10, count=10) == got
    assert box.pending() == 1
