"""The inbox pump: reads clients' data-only records and turns each into a task of the workers' own.

Each registered client can only XADD to its own inbox stream (unregistered clients in
development mode share the federation's). The pump reads every inbox through one consumer
group (so several ingest workers share the load), claims entries a dead pump left pending,
and for each entry enqueues an ingest task whose name, queue and options are ours; the record
itself is only ever an argument. An entry is acknowledged and deleted once its task is safely
enqueued, so nothing accepted is lost and junk does not accumulate.
"""

from __future__ import annotations

import logging
import threading
import time

import redis as redis_lib

from ..names import Task
from ..state.clients import ClientRegistry
from ..state.inbox import Inbox, InboxEntry, read_group
from .dispatch import Dispatcher
from .metrics import METRICS
from .runtime import Runtime

log = logging.getLogger(__name__)

#: records taken per read
BATCH = 64
#: how often the list of federations (and their consumer groups) is refreshed
REFRESH_S = 2.0


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
            except Exception:  # a bug must not stop ingestion for every federation
                log.exception("inbox pump: unexpected error; continuing")
                self._stop.wait(1.0)

    # -- one step --------------------------------------------------------------------------

    def step(self, *, block_ms: int = 0) -> int:
        """Claim what dead pumps left, read new records, enqueue them; returns how many were handled."""
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
            idle_ms = int(self.rt.settings.inbox_claim_idle_s * 1000)
            for inbox in self._inboxes:
                for entry in inbox.claim(self.consumer, idle_ms, BATCH):
                    handled += self._handle(inbox, entry)
        by_key = {(i.federation, i.client): i for i in self._inboxes}
        for entry in read_group(self.rt.redis, self._inboxes, self.consumer, count=BATCH, block_ms=block_ms):
            handled += self._handle(by_key[(entry.federation, entry.client)], entry)
        return handled

    def drain(self, federation: str) -> int:
        """Handle everything in one federation's inboxes now (``simulate`` and eager tests)."""
        inboxes = self._federation_inboxes(federation)
        total = 0
        while True:
            by_key = {(i.federation, i.client): i for i in inboxes}
            batch = read_group(self.rt.redis, inboxes, self.consumer, count=BATCH, block_ms=None)
            if not batch:
                return total
            for entry in batch:
                total += self._handle(by_key[(entry.federation, entry.client)], entry)

    def _federation_inboxes(self, federation: str) -> list[Inbox]:
        """The federation-wide inbox and every registered client's own (a revoked client's too: what it left
        there is drained and counted as unauthenticated)."""
        inboxes = [Inbox(self.rt.redis, federation)]
        inboxes += [
            Inbox(self.rt.redis, federation, info.client_id)
            for info in ClientRegistry(self.rt.redis, federation).list()
        ]
        for inbox in inboxes:
            inbox.ensure_group()
        return inboxes

    def _refresh(self) -> None:
        inboxes: list[Inbox] = []
        for federation in self.rt.state.federations():
            inboxes += self._federation_inboxes(federation)
        self._inboxes = inboxes
        self._refreshed = time.monotonic()

    def _handle(self, inbox: Inbox, entry: InboxEntry) -> int:
        # The record is passed on as data; the ingest task parses, authenticates and bounds it.
        raw = entry.record
        if raw is None or len(raw) > self.rt.settings.max_inbox_record_bytes:
            self.rt.state.count_rejected(entry.federation, "malformed")
            METRICS.deltas.labels(outcome="dropped", code="malformed").inc()
            log.warning("inbox %s: dropped a malformed record %s", inbox.key, entry.id)
        else:
            self.dispatch.send(Task.INGEST, entry.federation, entry.client or "", entry.id, raw)
        inbox.ack_delete([entry.id])
        return 1
