"""TEST-ONLY: the production ``chorus-mq`` CLI and Celery app, with faults switched on by environment.

    python -m tests.faults.faulty_app worker --concurrency 1 ...   # = chorus-mq worker + faults

Nothing here is imported by chorus_mq; production code has no fault hooks. The same app
object, tasks and settings run; these variables (read only here) bend them:

``CHORUS_FAULT_AGGREGATE_SLEEP=S``
    The first run of each round's aggregation sleeps S seconds after writing its result
    objects and before the manifest (the commit marker): a window to kill it mid-aggregation.
    Each arrival is counted in Redis (see :func:`hook_pid`) and logged.
``CHORUS_FAULT_AGGREGATE_BARRIER=N``
    Every run of an aggregation waits at that point until N runs of it have arrived (at most
    60 s): N concurrent runs of one aggregation, deterministically.
``CHORUS_FAULT_AGGREGATE_ROUNDS=1,2``
    The rounds the two hooks above apply to (default: round 1 only).
``CHORUS_FAULT_REDELIVER=reject-first|run-twice`` (tasks in ``CHORUS_FAULT_REDELIVER_TASKS``,
    default ``chorus.ingest,chorus.aggregate``)
    ``reject-first``: ``Reject(requeue=True)`` unless the delivery is a redelivery, so only a
    redelivered copy runs. ``run-twice``: run, then ``Reject(requeue=True)`` unless redelivered,
    so every task runs twice.
``CHORUS_FAULT_VISIBILITY_TIMEOUT=S``
    The broker's visibility timeout, set below the task time limits (the misconfiguration
    Settings refuses): Redis redelivers tasks that are still running.
``CHORUS_FAULT_RESTORE_INTERVAL=S``
    How often kombu looks for unacked messages past the visibility timeout (default: every
    ``10 s x 10`` calls), so redelivery comes about one visibility timeout after a loss.
``CHORUS_FAULT_RETRY_DELAY=S``
    The tasks' ``default_retry_delay``: the countdown of the retry after a lost pool child.
``CHORUS_FAULT_NO_S3_BACKOFF=1``
    boto3 retries without sleeping (which errors are retried, and how often, is unchanged).
``CHORUS_FAULT_S3_READ_TIMEOUT=S``
    boto3's read timeout (default 60 s), so a stalled S3 request times out quickly.
"""

from __future__ import annotations

import logging
import os
import time

# Only what tests import (fault_key, hook_pid) is light: the worker's modules load in install().

log = logging.getLogger("chorus.faults")
ENV = os.environ.get


def fault_key(federation: str, r: int) -> str:
    """Redis counter of the runs of round ``r``'s aggregation that reached the hook; ``:pids`` lists their pids."""
    return f"chorus:test:fault:{federation}:{r}"


def hook_pid(redis, federation: str, r: int, run: int = 1) -> int | None:
    """The pid of the process whose run number ``run`` reached the aggregate hook, if one has."""
    pid = redis.lindex(fault_key(federation, r) + ":pids", run - 1)
    return int(pid) if pid else None


def _patch_aggregate_hook(sleep_s: float, barrier: int, rounds: set[int]) -> None:
    from chorus_mq.workers import aggregate

    compute = getattr(aggregate, "_compute_and_write", None)
    if compute is None:  # fail loudly if the production code moved under the hook
        raise RuntimeError("faulty_app: chorus_mq.workers.aggregate._compute_and_write is gone; update the hook")

    def compute_then_pause(rt, federation, r, *args, **kwargs):
        manifest = compute(rt, federation, r, *args, **kwargs)
        if r not in rounds:
            return manifest
        key = fault_key(federation, r)
        run = rt.redis.incr(key)
        rt.redis.rpush(key + ":pids", os.getpid())  # tests wait on Redis, not on log buffering
        log.warning("FAULT aggregate-hook %s %s run %s pid %s", federation, r, run, os.getpid())
        if sleep_s and run == 1:
            time.sleep(sleep_s)
        if barrier:
            deadline = time.monotonic() + 60
            while int(rt.redis.get(key) or 0) < barrier and time.monotonic() < deadline:
                time.sleep(0.05)
            log.warning("FAULT aggregate-barrier %s %s passed", federation, r)
        return manifest

    aggregate._compute_and_write = compute_then_pause


def _patch_redeliver(app, mode: str, names: list[str]) -> None:
    from celery.exceptions import Reject

    if mode not in ("reject-first", "run-twice"):
        raise RuntimeError(f"CHORUS_FAULT_REDELIVER must be reject-first or run-twice, not {mode!r}")
    for name in names:
        task = app.tasks[name]
        run = task.run

        def run_with_redelivery(*args, _task=task, _run=run, **kwargs):
            redelivered = bool((_task.request.delivery_info or {}).get("redelivered"))
            log.warning("FAULT delivery %s[%s] redelivered=%s", _task.name, _task.request.id, redelivered)
            if redelivered:
                return _run(*args, **kwargs)
            if mode == "run-twice":
                _run(*args, **kwargs)
            log.warning("FAULT reject-requeue %s[%s]", _task.name, _task.request.id)
            raise Reject("test: requeue the first delivery", requeue=True)

        task.run = run_with_redelivery


def _patch_transport(app, visibility_timeout: str | None, restore_interval: str | None) -> None:
    options = dict(app.conf.broker_transport_options or {})
    if visibility_timeout:
        options["visibility_timeout"] = float(visibility_timeout)
    if restore_interval:
        options["unacked_restore_interval"] = float(restore_interval)
        options["unacked_restore_throttle"] = 1
    app.conf.broker_transport_options = options
    app.conf.result_backend_transport_options = options
    if visibility_timeout:
        app.conf.visibility_timeout = float(visibility_timeout)


def _patch_boto(no_backoff: bool, read_timeout: str | None) -> None:
    if no_backoff:
        from botocore.retries.standard import ExponentialBackoff
        ExponentialBackoff.delay_amount = lambda self, context: 0
    if read_timeout:
        from botocore.config import Config
        Config.OPTION_DEFAULTS["read_timeout"] = float(read_timeout)


def install() -> None:
    """Apply every fault the environment asks for (idempotent per process)."""
    from chorus_mq.workers import tasks
    from chorus_mq.workers.app import AGGREGATE_TASK, INGEST_TASK, app

    assert tasks.app is app  # the tasks are registered on the app the CLI starts
    if ENV("CHORUS_FAULT_AGGREGATE_SLEEP") or ENV("CHORUS_FAULT_AGGREGATE_BARRIER"):
        _patch_aggregate_hook(float(ENV("CHORUS_FAULT_AGGREGATE_SLEEP") or 0),
                              int(ENV("CHORUS_FAULT_AGGREGATE_BARRIER") or 0),
                              {int(r) for r in (ENV("CHORUS_FAULT_AGGREGATE_ROUNDS") or "1").split(",")})
    if ENV("CHORUS_FAULT_REDELIVER"):
        names = (ENV("CHORUS_FAULT_REDELIVER_TASKS") or f"{INGEST_TASK},{AGGREGATE_TASK}").split(",")
        _patch_redeliver(app, ENV("CHORUS_FAULT_REDELIVER"), names)
    _patch_transport(app, ENV("CHORUS_FAULT_VISIBILITY_TIMEOUT"), ENV("CHORUS_FAULT_RESTORE_INTERVAL"))
    if ENV("CHORUS_FAULT_RETRY_DELAY"):
        for name in (INGEST_TASK, AGGREGATE_TASK):
            app.tasks[name].default_retry_delay = float(ENV("CHORUS_FAULT_RETRY_DELAY"))
    _patch_boto(bool(ENV("CHORUS_FAULT_NO_S3_BACKOFF")), ENV("CHORUS_FAULT_S3_READ_TIMEOUT"))


if __name__ == "__main__":
    from chorus_mq.cli import main

    install()
    main(prog_name="chorus-mq")
