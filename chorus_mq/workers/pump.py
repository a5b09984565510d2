"""The inbox pump: reads clients' data-only records and turns each into a task of the workers' own.

Each registered client can only XADD to its own inbox stream (unregistered clients in
development mode share the federation's). The pump reads every inbox through one consumer
group (so several ingest workers share the load) on a connection that does not decode, and
decodes each entry on its own: whatever bytes a client writes are one junk entry of its own
inbox, counted and deleted, never an error for anyone else's.

Per pass, each inbox gives at most ``CHORUS_INBOX_MAX_IN_FLIGHT`` new entries, and none while it
already has that many awaiting their verdict, so one client's volume delays another's verdict by
a bounded amount and fewer than twice that many of a client's tasks are ever queued.
Each client has a rate budget (a token bucket, ``CHORUS_INBOX_RATE_PER_S`` and
``CHORUS_INBOX_BURST``): entries over it are dropped and counted, with one log line per client
and minute. Records are parsed and authenticated (signature, freshness, nonce) here, before
anything is queued; junk and forgeries are counted and deleted, an authenticated client's stale
or replayed record is rejected (the first per round and reason is published, repeats counted).

An entry that passes is queued as an ingest task whose name, queue and options are ours (the
record is only an argument) and stays pending until the task stores its verdict, which
retires the entry in the same Lua transition. Entries pending longer than
``CHORUS_INBOX_CLAIM_IDLE_S`` (their pump or worker died, their task was lost with Redis) are
claimed and queued again; the ingest path is idempotent, so every record gets its verdict.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import redis as redis_lib

from ..errors import AuthError, InvalidAdapter, Unauthenticated
from ..names import Task
from ..state.clients import ClientRegistry
from ..state.inbox import Inbox, InboxEntry, pending_counts, read_group
from . import auth, secure
from .dispatch import Dispatcher
from .ingest import parse_record
from .metrics import METRICS
from .runtime import Runtime

log = logging.getLogger(__name__)

#: entries claimed again from one inbox per pass
PER_CLIENT = 64
#: entries read at once from an inbox that is over its rate budget, to drop them in bulk
OVER_BUDGET_DRAIN = 256
#: how often the list of federations (and their consumer groups) is refreshed
REFRESH_S = 2.0
#: one rate-limit log line per client per this many seconds
RATE_LOG_S = 60.0


class InboxPump:
    """Move inbox records to the ingest queue, in a background thread or on demand (:meth:`drain`)."""

    def __init__(self, rt: Runtime, dispatch: Dispatcher, *, consumer: str):
        self.rt = rt
        self.dispatch = dispatch
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inboxes: list[Inbox] = []
        self._refreshed = 0.0
        self._claimed = 0.0
        #: (inbox key, what) -> (when its drops were last logged, drops since): one line per minute each
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="chorus-inbox-pump", daemon=True)
        self._thread.start()
        log.info("inbox pump %s started", self.consumer)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self) -> None:
        """Pump until stopped, surviving Redis restarts."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self.step(block_ms=self.rt.settings.inbox_block_ms)
                backoff = 0.5
            except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
                log.warning("inbox pump: Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                self._refreshed = 0.0  # groups may be gone after a restart without persistence
                self._claimed = 0.0  # what was in flight may have been lost with Redis: claim it soon
            except Exception:  # a bug must not stop ingestion for every federation
                log.exception("inbox pump: unexpected error; continuing")
                self._stop.wait(1.0)

    # -- one step --------------------------------------------------------------------------

    def step(self, *, block_ms: int = 0) -> int:
        """Claim entries whose verdict is late, read new records, queue them; returns how many were handled."""
        now = time.monotonic()
        if now - self._refreshed > REFRESH_S:
            self._refresh()
        if not self._inboxes:
            if block_ms:
                self._stop.wait(block_ms / 1000)
            return 0
        handled = 0
        if now - self._claimed > self.rt.settings.inbox_claim_idle_s / 3:
            self._claimed = now
            handled += self._claim(self._inboxes)
        limit = self.rt.settings.inbox_max_in_flight
        counts = pending_counts(self.rt.redis, self._inboxes)
        readable = [inbox for inbox, n in zip(self._inboxes, counts, strict=True) if n is None or n < limit]
        if not readable:
            if block_ms:
                self._stop.wait(min(block_ms, 200) / 1000)
            return handled
        # at most `limit` new entries per inbox and pass: fewer than 2 x limit of a client's await their verdict
        entries = self._read(readable, limit, block_ms)
        return handled + self._admit(readable, entries, budget=True)

    def drain(self, federation: str) -> int:
        """Handle everything in one federation's inboxes now (``simulate`` and eager tests; no rate budget)."""
        inboxes = self._federation_inboxes(federation)
        total = 0
        while True:
            batch = self._read(inboxes, PER_CLIENT, None)
            if not batch:
                return total
            total += self._admit(inboxes, batch, budget=False)

    def _read(self, inboxes: list[Inbox], count: int, block_ms: int | None) -> list[InboxEntry]:
        """New entries of ``inboxes`` for this consumer, at most ``count`` per inbox (undecoded, size-bounded)."""
        return read_group(
            self.rt.redis,
            inboxes,
            self.consumer,
            count=count,
            block_ms=block_ms,
            max_bytes=self.rt.settings.max_inbox_record_bytes,
        )

    def _federation_inboxes(self, federation: str) -> list[Inbox]:
        """The federation-wide inbox and every registered client's own (a revoked client's too: what it left
        there is drained and counted as unauthenticated)."""
        inboxes = [Inbox(self.rt.redis, federation)]
        inboxes += [
            Inbox(self.rt.redis, federation, info.client_id)
            for info in ClientRegistry(self.rt.redis, federation).list()
        ]
        for inbox in inboxes:
            try:
                inbox.ensure_group()
            except redis_lib.ResponseError as exc:  # e.g. a key of another type: that inbox only
                log.warning("inbox %s: cannot create its consumer group (%s)", inbox.key, exc)
        return inboxes

    def _refresh(self) -> None:
        inboxes: list[Inbox] = []
        for federation in self.rt.state.federations():
            try:
                inboxes += self._federation_inboxes(federation)
            except redis_lib.ResponseError as exc:  # one federation's broken state stays its own
                log.warning("federation %s: its inboxes cannot be listed (%s)", federation, exc)
        self._inboxes = inboxes
        self._refreshed = time.monotonic()

    def _claim(self, inboxes: list[Inbox]) -> int:
        """Queue again what waited for its verdict too long; each inbox on its own."""
        idle_ms = int(self.rt.settings.inbox_claim_idle_s * 1000)
        handled = 0
        for inbox in inboxes:
            try:
                claimed = inbox.claim(
                    self.consumer, idle_ms, PER_CLIENT, max_bytes=self.rt.settings.max_inbox_record_bytes
                )
            except redis_lib.ResponseError as exc:
                log.warning("inbox %s: claim failed (%s); the other inboxes are claimed", inbox.key, exc)
                continue
            if claimed:
                METRICS.reclaimed.inc(len(claimed))
                log.info("inbox %s: %d entries without a verdict claimed again", inbox.key, len(claimed))
                handled += self._admit([inbox], claimed, budget=False)
        return handled

    # -- entries ---------------------------------------------------------------------------

    def _admit(self, inboxes: list[Inbox], entries: list[InboxEntry], *, budget: bool) -> int:
        """Handle entries inbox by inbox: over-budget ones are dropped, each other one judged on its own."""
        by_key = {(i.federation, i.client): i for i in inboxes}
        grouped: dict[tuple[str, str | None], list[InboxEntry]] = collections.defaultdict(list)
        for entry in entries:
            grouped[(entry.federation, entry.client)].append(entry)
        handled = 0
        for key, batch in grouped.items():
            inbox = by_key[key]
            try:
                if budget and inbox.client is not None:
                    # registered clients' own inboxes; the development-mode shared inbox (unregistered
                    # clients, CHORUS_ALLOW_UNSIGNED) serves many senders and is bounded by in-flight work only
                    batch = self._within_budget(inbox, batch)
                for entry in batch:
                    try:
                        handled += self._handle(inbox, entry)
                    except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.ResponseError):
                        raise
                    except Exception:  # a bug on one record: it stays pending (claimed again later), the rest go on
                        log.exception("inbox %s: record %s could not be handled; it stays pending", inbox.key, entry.id)
            except redis_lib.ResponseError as exc:  # this inbox's state is broken: its entries wait
                log.warning("inbox %s: %s; its entries stay pending", inbox.key, exc)
        return handled

    def _within_budget(self, inbox: Inbox, batch: list[InboxEntry]) -> list[InboxEntry]:
        settings = self.rt.settings
        granted = inbox.take_tokens(
            self.rt.state.scripts, len(batch), rate=settings.inbox_rate_per_s, burst=settings.inbox_burst
        )
        if granted >= len(batch):
            return batch
        over = batch[granted:]
        # a client over its budget is flooding: take a larger bite of its inbox, dropped in one transaction
        over += inbox.read(self.consumer, OVER_BUDGET_DRAIN, max_bytes=settings.max_inbox_record_bytes)
        batch = batch[:granted]
        inbox.drop_many([e.id for e in over], "rate_limited")
        METRICS.deltas.labels(outcome="dropped", code="rate_limited").inc(len(over))
        budget = f"over its rate budget ({settings.inbox_rate_per_s:g} records/s, burst {settings.inbox_burst})"
        self._log_throttled(inbox, "rate_limited", len(over), budget)
        return batch

    def _log_throttled(self, inbox: Inbox, code: str, n: int, why: str) -> None:
        """One warning per inbox and code per :data:`RATE_LOG_S`, with the count since the last one."""
        last, since = self._logged.get((inbox.key, code), (-RATE_LOG_S, 0))
        now = time.monotonic()
        if now - last >= RATE_LOG_S:
            log.warning("inbox %s: %d records dropped (%s): %s", inbox.key, since + n, code, why[:200])
            self._logged[(inbox.key, code)] = (now, 0)
        else:
            self._logged[(inbox.key, code)] = (last, since + n)

    def _handle(self, inbox: Inbox, entry: InboxEntry) -> int:
        """Judge what can be judged without the object (junk, forgery, stale or replayed), else queue the
        ingest task; the record is passed on as data, and its entry stays pending until its verdict."""
        settings = self.rt.settings
        scripts = self.rt.state.scripts
        if entry.record is None:
            self._drop(inbox, entry, "malformed", "not one UTF-8 record field within the size limit")
            return 1
        if secure.is_secagg(entry.record):  # a secure round's phase record: verified and judged there
            secure.handle_record(self.rt, inbox, entry, self.dispatch)
            return 1
        try:
            msg = parse_record(entry.federation, entry.client, entry.record, settings.max_inbox_record_bytes)
        except InvalidAdapter as exc:  # not JSON, not a message
            self._drop(inbox, entry, exc.code, str(exc))
            return 1
        except Unauthenticated as exc:
            self._drop(inbox, entry, exc.code, str(exc))
            return 1
        try:
            auth.check(self.rt, msg)
        except Unauthenticated as exc:
            self._drop(inbox, entry, exc.code, str(exc))
            return 1
        except AuthError as exc:  # the client's own record, stale or replayed: it is told (once per round)
            r = msg.round or self.rt.state.current_round(msg.federation)
            event = {
                "client": msg.client_id,
                "upload_id": msg.upload_id,
                "sha256": msg.sha256,
                "reason": str(exc),
                "code": exc.code,
                "round": msg.round or 0,
            }
            inbox.reject(scripts, entry.id, r, msg.client_id, exc.code, event, maxlen=settings.events_maxlen)
            METRICS.deltas.labels(outcome="rejected", code=exc.code).inc()
            return 1
        self.dispatch.send(Task.INGEST, entry.federation, entry.client or "", entry.id, entry.record)
        return 1

    def _drop(self, inbox: Inbox, entry: InboxEntry, code: str, why: str) -> None:
        inbox.drop(self.rt.state.scripts, entry.id, code, maxlen=self.rt.settings.events_maxlen)
        METRICS.deltas.labels(outcome="dropped", code=code).inc()
        self._log_throttled(inbox, code, 1, f"e.g. record {entry.id}: {why}")
