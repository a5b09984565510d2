"""Client inboxes: data-only Redis Streams, read by workers through one consumer group.

Each registered client has its own stream and appends to it only through the Redis Function
``chorus_inbox_append`` (``lua/chorus_functions.lua``), which refuses records over the size limit and
appends beyond the inbox's record limit, so what a client can make Redis hold is bounded; no client's
commands can touch another's records. Unsigned records of unregistered clients (development mode) go to
one federation-wide stream. Every entry is one signed ingest record in field ``m``, which workers verify and turn
into their own tasks. Nothing a client writes is ever a task, a queue name or an option.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis as redis_lib
from redis import Redis
from redis.typing import KeyT, StreamIdT

from ..errors import ServiceUnavailable, TooLarge
from ..messages import RECORD_FIELD
from ..names import INBOX_APPEND_FUNCTION, INBOX_GROUP
from .functions import InboxLimits, load_functions
from .keys import FederationKeys
from .protocol import stream_items, text

#: XAUTOCLAIM calls one :meth:`Inbox.claim` makes at most (each scans a bounded slice of the pending list)
_CLAIM_PAGES = 10


class InboxEntry(NamedTuple):
    """One inbox entry. ``record`` is its field ``m`` when that is its only field, else None (junk: drop it).

    ``client`` names the client whose own inbox held it (None: the federation-wide inbox).
    """

    federation: str
    id: str
    record: str | None
    client: str | None = None


def _entries(federation: str, raw: Sequence[Any], client: str | None = None) -> list[InboxEntry]:
    out: list[InboxEntry] = []
    for entry_id, entry_fields in raw:
        if entry_fields is None:  # trimmed while pending (Redis 6.2 reports these as nil)
            continue
        fields: Mapping[str, Any] = {text(k): v for k, v in entry_fields.items()}
        value = fields.get(RECORD_FIELD) if len(fields) == 1 else None
        out.append(InboxEntry(federation, text(entry_id), None if value is None else text(value), client))
    return out


def _append_error(exc: redis_lib.ResponseError) -> Exception:
    """The error a refused append raises: the function's own codes become ours, anything else stays as it was."""
    message = str(exc)
    code, _, detail = message.partition(" ")
    if code == "CHORUS_TOO_LARGE":
        return TooLarge(f"inbox record refused: {detail}")
    if code == "CHORUS_INBOX_FULL":
        return ServiceUnavailable(f"inbox record refused: {detail}")
    return exc


class Inbox:
    """A client's inbox (or, with ``client=None``, the federation-wide one): :meth:`append` for clients,
    the rest for workers."""

    def __init__(self, redis: Redis, federation: str, client: str | None = None, *, limits: InboxLimits | None = None):
        self.redis = redis
        self.keys = FederationKeys(federation)
        self.federation = self.keys.federation
        self.client = client
        self.key = self.keys.inbox if client is None else self.keys.client_inbox(client)
        #: used only to load the function library where no worker has yet (development, tests)
        self.limits = limits or InboxLimits()

    # -- client side -------------------------------------------------------------------------

    def append(self, record_json: str) -> str:
        """Append one signed record through the bounded ``chorus_inbox_append`` function; returns the entry id.

        Raises :class:`TooLarge` for a record over the workers' limit and :class:`ServiceUnavailable` while
        the inbox is full (its records not yet handled) or no worker has loaded the function yet.
        """
        try:
            return self._append(record_json)
        except redis_lib.ResponseError as exc:
            if "function not found" not in str(exc).lower():
                raise _append_error(exc) from exc
        # no worker has loaded the library yet: load it where this connection may (never replacing one)
        try:
            load_functions(self.redis, self.limits, replace=False)
        except redis_lib.exceptions.NoPermissionError as exc:
            raise ServiceUnavailable(
                f"Redis has no {INBOX_APPEND_FUNCTION} function yet: the workers load it when they start; "
                "start them, then upload again"
            ) from exc
        try:
            return self._append(record_json)
        except redis_lib.ResponseError as exc:
            raise _append_error(exc) from exc

    def _append(self, record_json: str) -> str:
        return text(self.redis.fcall(INBOX_APPEND_FUNCTION, 1, self.key, record_json))

    # -- worker side -------------------------------------------------------------------------

    def ensure_group(self) -> bool:
        """Create the consumer group at id 0 (and the stream); False when it already existed."""
        try:
            self.redis.xgroup_create(self.key, INBOX_GROUP, id="0", mkstream=True)
        except redis_lib.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def claim(self, consumer: str, min_idle_ms: int, count: int) -> list[InboxEntry]:
        """Take over up to ``count`` entries another consumer left pending for ``min_idle_ms`` (it died)."""
        out: list[InboxEntry] = []
        start = "0-0"
        for _ in range(_CLAIM_PAGES):
            reply = self.redis.xautoclaim(
                self.key,
                INBOX_GROUP,
                consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=count - len(out),
            )
            start = text(reply[0])
            out += _entries(self.federation, reply[1], self.client)
            if start == "0-0" or len(out) >= count:
                break
        return out

    def ack_delete(self, ids: Sequence[str]) -> int:
        """Acknowledge and delete handled entries (one transaction); returns how many were pending."""
        if not ids:
            return 0
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, INBOX_GROUP, *ids)
            pipe.xdel(self.key, *ids)
            acked, _deleted = pipe.execute()
        return int(acked)

    def pending(self) -> int:
        """Entries delivered to a consumer and not yet acknowledged."""
        try:
            summary = self.redis.xpending(self.key, INBOX_GROUP)
        except redis_lib.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(summary["pending"])

    def length(self) -> int:
        """Entries in the stream (read or not): the inbox's depth."""
        return int(self.redis.xlen(self.key))


def read_group(
    redis: Redis, inboxes: Sequence[Inbox], consumer: str, count: int, block_ms: int | None
) -> list[InboxEntry]:
    """New entries of every given inbox, for ``consumer`` of the shared group.

    One XREADGROUP over all of them, blocking up to ``block_ms`` (None: not at all) for the first
    entry. Inboxes without the group get it (a client added while the pump was reading).
    """
    if not inboxes:
        if block_ms:
            time.sleep(block_ms / 1000)
        return []
    by_key = {inbox.key: inbox for inbox in inboxes}
    streams: dict[KeyT, StreamIdT] = dict.fromkeys(by_key, ">")
    try:
        reply = redis.xreadgroup(INBOX_GROUP, consumer, streams, count=count, block=block_ms)
    except redis_lib.ResponseError:
        # NOGROUP (an inbox without the group): make every group, then retry once; any other error repeats
        for inbox in inboxes:
            inbox.ensure_group()
        reply = redis.xreadgroup(INBOX_GROUP, consumer, streams, count=count, block=block_ms)
    out: list[InboxEntry] = []
    for stream, entries in stream_items(reply):
        inbox = by_key[stream]
        out += _entries(inbox.federation, entries, inbox.client)
    return out
