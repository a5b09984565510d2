"""The event stream: replayable, resumable, typed, survives a Redis restart."""

from __future__ import annotations

import threading
import time

import pytest

from chorus_mq.errors import StateCorrupt
from chorus_mq.names import EventType
from chorus_mq.state import Event, EventLog


def test_emit_read_and_resume(any_redis):
    log = EventLog(any_redis, "fed")
    first = log.emit("delta_rejected", 1, client="a", reason="bad")
    log.emit(EventType.ROUND_OPENED, 2, now=1234.5)
    events = log.read()
    assert [e.type for e in events] == [EventType.DELTA_REJECTED, EventType.ROUND_OPENED]
    assert isinstance(events[0], Event) and events[0].id == first
    assert (events[0].federation, events[0].round, events[0].get("reason")) == ("fed", 1, "bad")
    assert events[1].ts == 1234.5 and events[1].fields == {}
    assert events[0].to_dict() == {
        "id": first,
        "type": "delta_rejected",
        "federation": "fed",
        "round": 1,
        "ts": events[0].ts,
        "client": "a",
        "reason": "bad",
    }
    assert [e.type for e in log.read(after=first)] == ["round_opened"]
    assert log.last_id() == events[-1].id
    assert EventLog(any_redis, "other").last_id() == "0-0"


def test_unknown_types_and_junk_entries_are_refused(any_redis):
    log = EventLog(any_redis, "fed")
    with pytest.raises(ValueError):
        log.emit("round_exploded", 1)
    any_redis.xadd(log.keys.events, {"data": '{"type": "nope"}'})
    with pytest.raises(StateCorrupt):
        log.read()


@pytest.mark.services
def test_events_are_published_too(real_redis):
    log = EventLog(real_redis, "fed")
    pubsub = real_redis.pubsub()
    pubsub.subscribe(log.keys.channel)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    log.emit("round_opened", 1)
    msg = pubsub.get_message(timeout=2)
    assert msg and '"round_opened"' in msg["data"]


@pytest.mark.services
def test_follow_survives_redis_restart(redis_server):
    client = redis_server.client()
    client.flushall()
    log = EventLog(client, "fed")
    log.emit("round_opened", 1)
    seen = []
    heartbeats = []

    def consume():
        for ev in EventLog(redis_server.client(), "fed").follow(
            poll_ms=200, reconnect_s=0.1, deadline=time.monotonic() + 30
        ):
            if ev is None:
                heartbeats.append(1)
                continue
            seen.append(ev.type)
            if len(seen) == 3:
                return

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    log.emit("delta_accepted", 1)
    redis_server.restart()  # AOF on: the stream survives
    EventLog(redis_server.client(), "fed").emit("round_complete", 1)
    t.join(timeout=40)
    assert seen == ["round_opened", "delta_accepted", "round_complete"]
    assert heartbeats  # idle polls yield None so callers can check their own deadlines
