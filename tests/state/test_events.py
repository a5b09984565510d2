"""The event stream: replayable, resumable, survives a Redis restart."""

from __future__ import annotations

import threading
import time

from chorus_mq.state import EventLog


def test_emit_read_and_resume(any_redis):
    log = EventLog(any_redis, "fed")
    first = log.emit("delta_rejected", 1, client="a", reason="bad")
    log.emit("round_opened", 2)
    events = log.read()
    assert [e["type"] for _, e in events] == ["delta_rejected", "round_opened"]
    assert {"type", "federation", "round", "ts"} <= set(events[0][1])
    assert events[0][1]["reason"] == "bad"
    assert [e["type"] for _, e in log.read(after=first)] == ["round_opened"]
    assert log.last_id() == events[-1][0]


def test_events_are_published_too(real_redis):
    log = EventLog(real_redis, "fed")
    pubsub = real_redis.pubsub()
    pubsub.subscribe(log.keys.channel)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    log.emit("round_opened", 1)
    msg = pubsub.get_message(timeout=2)
    assert msg and '"round_opened"' in msg["data"]


def test_follow_survives_redis_restart(redis_server):
    client = redis_server.client()
    client.flushall()
    log = EventLog(client, "fed")
    log.emit("round_opened", 1)
    seen = []

    def consume():
        for _id, ev in EventLog(redis_server.client(), "fed").follow(poll_ms=200, reconnect_s=0.1,
                                                                     deadline=time.monotonic() + 30):
            if ev:
                seen.append(ev["type"])
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
