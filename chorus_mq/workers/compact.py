"""Compaction, off every round's critical path: a snapshot of the cumulative correction.

The correction a late joiner, an export or an audit needs is the sum of every round's residual.
Rounds never compute it; this task does, on demand (``chorus-mq compact``) and every
``--checkpoint-every`` rounds: the latest snapshot before plus the increments after it,
summed module by module, written write-once, and recorded in Redis only once complete. A
compaction that dies midway leaves nothing recorded, so every round stays pullable, and a
failed compaction never fails a round.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..layout import snapshot_key
from ..names import EventType
from ..results import complete_rounds, fetch_manifest, sum_residual_files
from ..state.rounds import SnapshotRecord
from .metrics import METRICS
from .runtime import Runtime

log = logging.getLogger(__name__)


def compact(rt: Runtime, federation: str, upto: int) -> str:
    """Snapshot Σ residuals of the complete rounds <= ``upto``. Idempotent; safe to run twice at once."""
    started = time.perf_counter()
    snapshots = rt.state.snapshots(federation)
    if upto in snapshots:
        return "exists"
    config = rt.state.config(federation)
    # a short lock, renewed while this runs: a compaction killed midway blocks the next one for one lease only
    lock = rt.redis.lock(rt.state.keys(federation).compaction, timeout=rt.settings.aggregation_lease, blocking=False)
    if not lock.acquire():
        return "busy"  # another worker is on it; write-once objects make a second run harmless anyway
    stop = threading.Event()
    keeper = threading.Thread(target=_keep, args=(lock, stop, rt.settings.lease_renew_interval), daemon=True)
    keeper.start()
    try:
        base = max((r for r in snapshots if r < upto), default=None)
        with tempfile.TemporaryDirectory(dir=rt.spool, prefix="compact-") as tmp, contextlib.ExitStack() as held:

            def local(key: str, sha256: str) -> Path:
                # file:// hashes the object in place (no copy of history on the worker's disk); s3:// spools it
                obj = held.enter_context(
                    rt.store.local_copy(key, expected_sha256=sha256, max_bytes=None, spool_dir=tmp)
                )
                return obj.path

            parts: list[Path] = []
            if base is not None:
                parts.append(local(snapshots[base].key, snapshots[base].sha256))
            rounds = complete_rounds(rt.state, federation, base or 0, upto)
            for r in rounds:
                manifest, _ = fetch_manifest(rt.state, rt.store, federation, r)
                # shards hold disjoint modules: their objects are summed as they are, in round order
                parts += [local(s.residual.key, s.residual.sha256) for s in manifest.shards if s.residual is not None]
            # written once, in place for file:// (the store names it by its hash at the end)
            with rt.store.writer(lambda digest: snapshot_key(federation, upto, digest)) as out:
                out.file.close()
                out.trusted_sha256 = sum_residual_files(parts, out.path, dtype=config.snapshot_dtype)
            key, sha, size = out.result.key, out.result.sha256, out.result.size
        record = SnapshotRecord(
            round=upto,
            key=key,
            sha256=sha,
            size=size,
            dtype=config.snapshot_dtype,
            base=base,
            rounds=len(rounds),
            created_at=time.time(),
        )
        stored = rt.state.add_snapshot(federation, record)
        seconds = time.perf_counter() - started
        METRICS.phase_seconds.labels(phase="compact").observe(seconds)
        METRICS.bytes_out.labels(task="compact").inc(size)
        rt.state.events(federation).emit(
            EventType.SNAPSHOT_READY,
            upto,
            key=stored.key,
            sha256=stored.sha256,
            size=stored.size,
            seconds=round(seconds, 3),
        )
        log.info(
            "compacted %s up to round %s (%d increments, %d bytes) in %.2fs",
            federation,
            upto,
            len(rounds),
            size,
            seconds,
        )
        return "ok"
    finally:
        stop.set()
        keeper.join(timeout=5)
        try:
            lock.release()
        except Exception:  # expired: fine, the objects are write-once
            log.debug("compaction lock of %s already released", federation)


def _keep(lock: Any, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            lock.reacquire()
        except Exception as exc:  # lost it (expired, Redis blinked): the run goes on, write-once keeps it safe
            log.warning("compaction lock could not be renewed: %s", exc)
            return
