"""Round events: appended to a Redis Stream (replayable) and published (a wake-up only)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from redis import Redis

from ..errors import StateCorrupt
from ..names import TERMINAL_EVENTS, EventType
from .protocol import opt_text, stream_items, text
from .redis_keys import FederationKeys
from .scripts import Arg, Scripts

_BASE_FIELDS = ("type", "federation", "round", "ts")


@dataclass(frozen=True)
class Event:
    """One event: ``id`` is its stream id (resume after it); ``fields`` holds everything else it carries."""

    id: str
    type: EventType
    federation: str
    round: int
    ts: float
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """Whether the round never changes after this event."""
        return self.type in TERMINAL_EVENTS

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The event as published (plus its id)."""
        return {
            "id": self.id,
            "type": self.type.value,
            "federation": self.federation,
            "round": self.round,
            "ts": self.ts,
            **self.fields,
        }

    @classmethod
    def parse(cls, entry_id: str, data: str) -> Event:
        """An event from its stream entry (field ``data``, JSON)."""
        try:
            body = json.loads(data)
            return cls(
                id=entry_id,
                type=EventType(body["type"]),
                federation=str(body["federation"]),
                round=int(body["round"]),
                ts=float(body["ts"]),
                fields={k: v for k, v in body.items() if k not in _BASE_FIELDS},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateCorrupt(f"event {entry_id} is not an event: {exc}") from None


def prelude_args(federation: str, round_: int, maxlen: int, now: float | None = None) -> list[Arg]:
    """The ARGV[1..5] every script takes (see lua/_prelude.lua)."""
    now = time.time() if now is None else now
    return [federation, int(round_), repr(float(now)), int(maxlen), FederationKeys(federation).channel]


class EventLog:
    """Append to and read from one federation's event stream."""

    def __init__(self, redis: Redis, federation: str, maxlen: int = 100_000, scripts: Scripts | None = None):
        self.redis = redis
        self.keys = FederationKeys(federation)
        self.federation = self.keys.federation
        self.maxlen = maxlen
        self._scripts = scripts or Scripts(redis)

    def emit(self, type_: EventType | str, round_: int, *, now: float | None = None, **fields: Any) -> str:
        """Append and publish one event (workers only); returns its stream id."""
        event = {**fields, "type": EventType(type_).value, "round": int(round_)}
        args = prelude_args(self.federation, round_, self.maxlen, now)
        return self._scripts.emit(keys=[self.keys.events], args=[*args, json.dumps(event)]).detail

    def last_id(self) -> str:
        """Id of the newest event, or ``0-0``: read after it to see only what comes next."""
        newest = self.redis.xrevrange(self.keys.events, count=1)
        return (opt_text(newest[0][0]) or "0-0") if newest else "0-0"

    def read(self, after: str = "0-0", count: int = 1000, block_ms: int | None = None) -> list[Event]:
        """Events after stream id ``after`` (oldest first); blocks up to ``block_ms`` for new ones."""
        reply = self.redis.xread({self.keys.events: after}, count=count, block=block_ms)
        out: list[Event] = []
        for _stream, entries in stream_items(reply):
            for entry_id, entry in entries:
                out.append(Event.parse(text(entry_id), text(entry[_data_field(entry)])))
        return out

    def follow(
        self,
        after: str = "0-0",
        *,
        poll_ms: int = 1000,
        reconnect_s: float = 0.5,
        deadline: float | None = None,
    ) -> Iterator[Event | None]:
        """Yield events from ``after`` on, surviving Redis restarts by resuming from the last id seen.

        Yields None after each poll that brought nothing (a heartbeat: callers check their own
        deadlines); stops at ``deadline`` (``time.monotonic()``), or never when it is None.
        """
        while deadline is None or time.monotonic() < deadline:
            try:
                batch = self.read(after, block_ms=poll_ms)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError):
                time.sleep(reconnect_s)
                continue
            for event in batch:
                after = event.id
                yield event
            if not batch:
                yield None


def _data_field(entry: Mapping[Any, Any]) -> Any:
    return "data" if "data" in entry else b"data"
