"""Round events: appended to a Redis Stream (replayable) and published (a wake-up only)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis as redis_lib
from redis import Redis

from .keys import FederationKeys
from .scripts import Scripts

TERMINAL = {"round_complete", "round_failed"}


def make_event(type_: str, federation: str, round_: int, **fields: Any) -> dict[str, Any]:
    """An event as published: at least ``type``, ``federation``, ``round``, ``ts``."""
    return {"type": type_, "federation": federation, "round": round_, "ts": time.time(), **fields}


def prelude_args(federation: str, round_: int, maxlen: int, now: float | None = None) -> list:
    """The ARGV[1..5] every script takes (see lua/_prelude.lua)."""
    now = time.time() if now is None else now
    return [federation, round_, repr(float(now)), maxlen, FederationKeys(federation).channel]


class EventLog:
    """Append to and read from one federation's event stream."""

    def __init__(self, redis: Redis, federation: str, maxlen: int = 100_000, scripts: Scripts | None = None):
        self.redis = redis
        self.federation = federation
        self.keys = FederationKeys(federation)
        self.maxlen = maxlen
        self._scripts = scripts or Scripts(redis)

    def emit(self, type_: str, round_: int, **fields: Any) -> str:
        event = make_event(type_, self.federation, round_, **fields)
        args = prelude_args(self.federation, round_, self.maxlen, event["ts"])
        return self._scripts.emit(keys=[self.keys.events], args=[*args, json.dumps(event)])

    def last_id(self) -> str:
        """Id of the newest event, or ``0-0``: read after it to see only what comes next."""
        newest = self.redis.xrevrange(self.keys.events, count=1)
        return newest[0][0] if newest else "0-0"

    def read(self, after: str = "0-0", count: int = 1000, block_ms: int | None = None) -> list[tuple[str, dict]]:
        """Events after stream id ``after`` (oldest first); blocks up to ``block_ms`` for new ones."""
        reply = self.redis.xread({self.keys.events: after}, count=count, block=block_ms)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append((entry_id, json.loads(fields["data"])))
        return out

    def follow(self, after: str = "0-0", *, poll_ms: int = 1000, reconnect_s: float = 0.5,
               deadline: float | None = None) -> Iterator[tuple[str, dict]]:
        """Yield events forever from ``after``, surviving Redis restarts by resuming from the last id seen."""
        while deadline is None or time.monotonic() < deadline:
            try:
                batch = self.read(after, block_ms=poll_ms)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError):
                time.sleep(reconnect_s)
                continue
            for entry_id, event in batch:
                after = entry_id
                yield entry_id, event
            if not batch:
                yield "", {}  # heartbeat, lets callers check their own deadlines
