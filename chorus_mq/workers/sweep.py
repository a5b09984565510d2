"""The periodic sweep: deadlines, aggregations whose lease ran out, compactions that are due, and the
plan and shard keys of ended rounds.

Every step is a Lua transition that checks the state it expects, so two sweeps at once (two
beats, or a beat and a manual run) cannot close or aggregate a round twice. Each federation
is swept on its own: an error in one is logged and counted and never stops the others.

An expired lease with nothing waiting in the broker first gets the same epoch's missing tasks
re-sent (a lost message costs one lease period, not an attempt); only when a re-send made no
progress does the round get a new epoch (a reclaim, one of its attempts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ..names import Queue, RoundStatus, ScriptStatus, ServerOptimizer, Task
from .dispatch import Dispatcher
from .flush_order import waiting_flush
from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    fired: list[tuple[str, int]] = field(default_factory=list)
    extended: list[tuple[str, int]] = field(default_factory=list)
    expired: list[tuple[str, int]] = field(default_factory=list)
    reclaimed: list[tuple[str, int]] = field(default_factory=list)
    resent: list[tuple[str, int]] = field(default_factory=list)
    busy: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    compactions: list[tuple[str, int]] = field(default_factory=list)
    collected: list[tuple[str, int]] = field(default_factory=list)
    states: list[tuple[str, int]] = field(default_factory=list)  # rounds whose server optimiser state went
    secure: list[tuple[str, str]] = field(default_factory=list)  # secure federations: what their sweep did
    errors: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(bool(v) for v in vars(self).values())


def sweep(rt: Runtime, dispatch: Dispatcher, now: float | None = None) -> SweepReport:
    """One pass over every federation."""
    report = SweepReport()
    busy = _fleet_busy(rt)
    for federation in rt.state.federations():
        try:
            _sweep_one(rt, dispatch, federation, now, busy, report)
        except Exception as exc:  # isolate: one broken federation never stops the sweep of the others
            log.exception("sweep of federation %s failed", federation)
            report.errors[federation] = f"{type(exc).__name__}: {exc}"
    if report:
        log.info("sweep: %s", report)
    return report


def _sweep_one(
    rt: Runtime, dispatch: Dispatcher, federation: str, now: float | None, busy: bool, report: SweepReport
) -> None:
    secure = rt.state.config(federation).secure_aggregation
    if secure:
        from . import secure as secure_rounds

        # the phases' own deadlines; a secure round fires and commits there, never through plan/shards
        outcome = secure_rounds.sweep(rt, federation, dispatch, now=now)
        if outcome not in ("open", "waiting", "done"):
            report.secure.append((federation, outcome))
    due, stale = rt.state.due(federation, now)
    for r in due:
        t = rt.state.close(federation, r, "deadline", now)
        if t.status == ScriptStatus.FIRED:
            dispatch.send(Task.ROUND, federation, r, t.epoch)
            report.fired.append((federation, r))
        elif t.status == ScriptStatus.EXTENDED:
            report.extended.append((federation, r))
        elif t.status == ScriptStatus.EXPIRED:
            report.expired.append((federation, r))
    for r in stale:
        info = rt.state.round(federation, r)
        if info.state != RoundStatus.AGGREGATING:
            rt.state.reclaim(federation, r, now)  # drops the stale lease entry
            continue
        if secure:  # a publish that died after firing: the aggregate workers publish it again, the same bytes
            rt.state.extend_lease(federation, r, now)
            dispatch.send(Task.SECURE_UNMASK, federation, r, "deadline")
            report.resent.append((federation, r))
            continue
        if busy:
            # the round's tasks may be waiting behind others in the queue: nobody is running them,
            # but nothing was lost either. Wait instead of duplicating (and counting an attempt).
            rt.state.extend_lease(federation, r, now)
            report.busy.append((federation, r))
            continue
        if waiting_flush(rt, federation, r):
            # a buffered flush waiting for the one before it: not a dead worker. Keep its lease, and re-send
            # its round task (its retries may be spent) so it starts as soon as it can
            rt.state.extend_lease(federation, r, now)
            dispatch.send(Task.ROUND, federation, r, info.epoch)
            report.busy.append((federation, r))
            continue
        again = rt.state.redispatch(federation, r, now)
        if again.status == ScriptStatus.RESEND:
            _resend(rt, dispatch, federation, r, again.epoch)
            report.resent.append((federation, r))
            continue
        if again.status != ScriptStatus.STUCK:  # another sweep acted, or the round ended meanwhile
            continue
        attempts = rt.settings.max_aggregation_attempts
        if info.reclaims + 1 >= attempts:
            t = rt.state.fail(
                federation,
                r,
                info.epoch,
                f"aggregation did not finish in {attempts} attempts (workers died or timed out)",
                now,
            )
            if t.status == ScriptStatus.OK:
                report.failed.append((federation, r))
            continue
        t = rt.state.reclaim(federation, r, now)
        if t.status == ScriptStatus.RECLAIMED:
            dispatch.send(Task.ROUND, federation, r, t.epoch)
            report.reclaimed.append((federation, r))
    _compaction_due(rt, dispatch, federation, report)
    report.collected += [(federation, r) for r in rt.state.collect_round_work(federation)]
    if rt.state.config(federation).server_opt != ServerOptimizer.NONE:
        from .server_step import collect_states  # torch: imported only where a federation steps

        # what a commit killed between finalize and its own collection leaves
        report.states += [(federation, r) for r in collect_states(rt, federation)]


def _resend(rt: Runtime, dispatch: Dispatcher, federation: str, r: int, epoch: int) -> None:
    """Send what round ``r`` still needs under ``epoch``: its round task (no plan yet), its missing shards,
    or its commit. Every task is idempotent under the epoch; a duplicate of a live one only repeats it."""
    raw = rt.state.plan(federation, r)
    if raw is None:
        dispatch.send(Task.ROUND, federation, r, epoch)
        return
    total = len(json.loads(raw)["shards"])
    done = rt.state.shards(federation, r)
    missing = [k for k in range(total) if k not in done]
    for k in missing:
        dispatch.send(Task.SHARD, federation, r, epoch, k)
    if not missing:
        dispatch.send(Task.COMMIT, federation, r, epoch)
    log.warning(
        "round %s/%s epoch %s: lease ran out with nothing queued; re-sent %s",
        federation,
        r,
        epoch,
        f"shards {missing}" if missing else "the commit",
    )


def _compaction_due(rt: Runtime, dispatch: Dispatcher, federation: str, report: SweepReport) -> None:
    config = rt.state.config(federation)
    if not config.checkpoint_every:
        return
    latest = rt.state.latest_complete(federation)
    if latest is None or latest < config.checkpoint_every:
        return
    due = latest - latest % config.checkpoint_every
    if due in rt.state.snapshots(federation):
        return
    if rt.redis.exists(rt.state.keys(federation).compaction) or _queued(rt, Queue.COMPACT):
        return  # a live compaction renews its lock; a queued one will run: asking again would only repeat it
    if request_compaction(rt, dispatch, federation, due):
        report.compactions.append((federation, due))


def request_compaction(rt: Runtime, dispatch: Dispatcher, federation: str, r: int) -> bool:
    """Enqueue round ``r``'s compaction unless it was enqueued within the last lease period (the commit of a
    checkpoint round and the sweep both ask; one task goes out). Returns whether it was enqueued.

    A compaction lost with its worker, or refused as ``busy`` by the lock of a killed one, is asked again
    by the sweep once both this request and that lock have expired: within about two lease periods."""
    if not rt.state.request_compaction(federation, r, rt.settings.aggregation_lease):
        return False
    dispatch.send(Task.COMPACT, federation, r)
    return True


def _queued(rt: Runtime, queue: Queue) -> bool:
    """Whether tasks wait in ``queue`` (a broker we cannot read counts as empty: keep sweeping)."""
    try:
        return int(rt.broker.llen(queue.value)) > 0
    except Exception as exc:
        log.warning("cannot read the length of %s: %s", queue.value, exc)
        return False


def _fleet_busy(rt: Runtime) -> bool:
    """Whether aggregation tasks are waiting in the broker (then an expired lease means a wait, not a loss)."""
    return _queued(rt, Queue.AGGREGATE)
