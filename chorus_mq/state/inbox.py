"""Client inboxes: data-only Redis Streams, read by workers through one consumer group.

Each registered client has its own stream and appends to it only through the Redis Function
``chorus_inbox_append`` (``lua/chorus_functions.lua``), which refuses records over the size limit and
appends beyond the inbox's record limit, so what a client can make Redis hold is bounded; no client's
commands can touch another's records. Unsigned records of unregistered clients (development mode) go to
one federation-wide stream. Every entry is one signed ingest record in field ``m``, which workers verify and turn
into their own tasks. Nothing a client writes is ever a task, a queue name or an option.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis as redis_lib
from redis import Redis
from redis.client import NEVER_DECODE

from ..errors import ServiceUnavailable, TooLarge
from ..messages import RECORD_FIELD
from ..names import INBOX_APPEND_FUNCTION, INBOX_GROUP
from .events import prelude_args
from .functions import InboxLimits, load_functions
from .protocol import Reply, stream_items, text
from .redis_keys import FederationKeys
from .scripts import Scripts

#: XAUTOCLAIM calls one :meth:`Inbox.claim` makes at most (each scans a bounded slice of the pending list)
_CLAIM_PAGES = 10

log = logging.getLogger(__name__)
_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")


class InboxEntry(NamedTuple):
    """One inbox entry. ``record`` is its field ``m`` as text when that is its only field, is valid UTF-8 and
    fits the size bound the reader gave; else None (junk: count it and drop it).

    ``client`` names the client whose own inbox held it (None: the federation-wide inbox).
    """

    federation: str
    id: str
    record: str | None
    client: str | None = None


#: the record field as it arrives on a connection that does not decode replies
_RECORD_KEY = RECORD_FIELD.encode()


def _raw(redis: Redis, *args: Any) -> Any:
    """Run a command and return its reply undecoded, whatever the connection's ``decode_responses``."""
    return redis.execute_command(*args, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]


def _record_of(fields: Any, max_bytes: int | None) -> str | None:
    """The record an entry's raw fields carry, or None for anything else a client could XADD."""
    try:
        if not isinstance(fields, Mapping) or len(fields) != 1:
            return None
        (key, value), *_ = fields.items()
        key = key.encode() if isinstance(key, str) else key
        value = value.encode() if isinstance(value, str) else value
        if key != _RECORD_KEY or not isinstance(value, bytes):
            return None
        if max_bytes is not None and len(value) > max_bytes:
            return None
        return value.decode("utf-8")
    except (UnicodeDecodeError, AttributeError, TypeError, ValueError):
        return None


def _entries(federation: str, raw: Any, client: str | None = None, max_bytes: int | None = None) -> list[InboxEntry]:
    """Raw (undecoded) stream entries as typed ones; each is decoded on its own, so one bad entry is one junk
    entry and never an error for the rest."""
    out: list[InboxEntry] = []
    for item in raw or ():
        try:
            entry_id, entry_fields = item
            if entry_fields is None:  # trimmed while pending (Redis 6.2 reports these as nil)
                continue
            out.append(InboxEntry(federation, text(entry_id), _record_of(entry_fields, max_bytes), client))
        except (ValueError, TypeError, UnicodeDecodeError):
            continue  # not an entry at all: nothing to acknowledge by id
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

    def claim(self, consumer: str, min_idle_ms: int, count: int, *, max_bytes: int | None = None) -> list[InboxEntry]:
        """Take over up to ``count`` entries pending for ``min_idle_ms``: a consumer died, or the ingest task
        that should judge them was lost. Read undecoded, decoded per entry."""
        out: list[InboxEntry] = []
        start = "0-0"
        for _ in range(_CLAIM_PAGES):
            reply = _raw(
                self.redis,
                "XAUTOCLAIM",
                self.key,
                INBOX_GROUP,
                consumer,
                min_idle_ms,
                start,
                "COUNT",
                count - len(out),
            )
            start = text(reply[0])
            out += _entries(self.federation, reply[1], self.client, max_bytes)
            if start == "0-0" or len(out) >= count:
                break
        return out

    def read(self, consumer: str, count: int, *, max_bytes: int | None = None) -> list[InboxEntry]:
        """New entries of this inbox alone (no blocking), undecoded and decoded per entry; makes the group if
        it is missing."""
        for attempt in (0, 1):
            try:
                reply = _raw(
                    self.redis,
                    "XREADGROUP",
                    "GROUP",
                    INBOX_GROUP,
                    consumer,
                    "COUNT",
                    count,
                    "STREAMS",
                    self.key,
                    ">",
                )
                break
            except redis_lib.ResponseError:
                if attempt:
                    raise
                self.ensure_group()  # no group (or no stream) yet; any other error repeats
        out: list[InboxEntry] = []
        for _stream, entries in stream_items(reply):
            out += _entries(self.federation, entries, self.client, max_bytes)
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

    def drop_many(self, ids: Sequence[str], code: str) -> int:
        """Retire many entries and count them under ``code``, in one transaction (rate-limited floods)."""
        if not ids:
            return 0
        if not _CODE.fullmatch(code):
            raise ValueError(f"verdict code {code!r} must be a short snake_case word")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, INBOX_GROUP, *ids)
            pipe.xdel(self.key, *ids)
            pipe.hincrby(self.keys.rejected, code, len(ids))
            acked, _deleted, _count = pipe.execute()
        return int(acked)

    def take_tokens(self, scripts: Scripts, want: int, *, rate: float, burst: int) -> int:
        """Take up to ``want`` tokens of this inbox's rate budget; returns how many were granted."""
        reply = scripts.take_tokens(
            keys=[self.keys.rate(self.client)],
            args=[*prelude_args(self.federation, 0, 1, time.time()), repr(float(rate)), int(burst), int(want)],
        )
        return reply.n

    def drop(self, scripts: Scripts, entry_id: str, code: str, *, maxlen: int) -> Reply:
        """Retire a junk or unauthenticated entry and count it under ``code`` (one transition; nothing published).
        ``judged``: another worker retired it first."""
        return self._judge(scripts, entry_id, "drop", code, "", None, 0, maxlen)

    def reject(
        self, scripts: Scripts, entry_id: str, r: int, client: str, code: str, event: Mapping[str, Any], *, maxlen: int
    ) -> Reply:
        """Retire an authenticated client's entry with a rejection (one transition): the first per client, round
        and code is published as ``delta_rejected`` with ``event``'s fields, repeats are counted."""
        return self._judge(scripts, entry_id, "reject", code, client, event, r, maxlen)

    def _judge(
        self,
        scripts: Scripts,
        entry_id: str,
        mode: str,
        code: str,
        client: str,
        event: Mapping[str, Any] | None,
        r: int,
        maxlen: int,
    ) -> Reply:
        if not _CODE.fullmatch(code):
            raise ValueError(f"verdict code {code!r} must be a short snake_case word")
        return scripts.judge(
            keys=[self.key, self.keys.events, self.keys.rejected, self.keys.rejections(r)],
            args=[
                *prelude_args(self.federation, r, maxlen, time.time()),
                entry_id,
                INBOX_GROUP,
                mode,
                code,
                client,
                json.dumps(dict(event or {}), sort_keys=True),
            ],
        )

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


def pending_counts(redis: Redis, inboxes: Sequence[Inbox]) -> list[int | None]:
    """Entries delivered and not yet judged, per inbox, in one round trip (None where the inbox failed)."""
    if not inboxes:
        return []
    with redis.pipeline(transaction=False) as pipe:
        for inbox in inboxes:
            pipe.xpending(inbox.key, INBOX_GROUP)
        replies = pipe.execute(raise_on_error=False)
    out: list[int | None] = []
    for reply in replies:
        if isinstance(reply, redis_lib.ResponseError) and "NOGROUP" in str(reply):
            out.append(0)
        elif isinstance(reply, Exception):
            out.append(None)
        else:
            out.append(int(reply["pending"]))
    return out


def read_group(
    redis: Redis,
    inboxes: Sequence[Inbox],
    consumer: str,
    count: int,
    block_ms: int | None,
    *,
    max_bytes: int | None = None,
) -> list[InboxEntry]:
    """New entries of every given inbox, at most ``count`` from each, for ``consumer`` of the shared group.

    One XREADGROUP over all of them, blocking up to ``block_ms`` (0 or None: not at all) for the first
    entry, read without decoding (a client's bytes are not promised to be text) and decoded per
    entry. When that read fails (an inbox without the group, a key of another type), each inbox
    is read on its own, so one inbox's failure reaches no other's entries; inboxes without the
    group get it (a client added while the pump was reading).
    """
    if not inboxes:
        if block_ms:
            time.sleep(block_ms / 1000)
        return []
    by_key = {inbox.key: inbox for inbox in inboxes}
    args: list[Any] = ["XREADGROUP", "GROUP", INBOX_GROUP, consumer, "COUNT", count]
    if block_ms:  # 0 or None: do not block (Redis reads BLOCK 0 as "forever")
        args += ["BLOCK", block_ms]
    args += ["STREAMS", *by_key, *([">"] * len(by_key))]
    try:
        reply = _raw(redis, *args)
    except redis_lib.ResponseError:
        out: list[InboxEntry] = []
        for inbox in inboxes:
            try:
                out += inbox.read(consumer, count, max_bytes=max_bytes)
            except redis_lib.ResponseError as exc:
                log.warning("inbox %s cannot be read (%s); the others are read", inbox.key, exc)
        return out
    out = []
    for stream, entries in stream_items(reply):
        found = by_key.get(text(stream))
        if found is not None:
            out += _entries(found.federation, entries, found.client, max_bytes)
    return out
