"""TEST-ONLY: the production ``chorus-mq`` CLI and Celery app, with faults switched on by environment.

    python -m tests.faults.faulty_app worker --role all --concurrency 1 ...   # = chorus-mq worker + faults

Nothing here is imported by chorus_mq; production code has no fault hooks. The same app
object, tasks and settings run; the hooks wrap production functions at the windows that
matter, and refuse to start if those functions moved or changed their signature:

``pump``     the inbox pump has read a record (it is pending in the consumer group) and has
             neither enqueued its ingest task nor acknowledged it;
``ingest``   the ingest task has copied and indexed the delta and not registered it yet;
``plan``     the round task has computed the plan and not stored it yet;
``shard``    a shard task has written its two objects and not recorded ``shard_done`` yet;
``commit``   the commit task has written the manifest and not finalized yet;
``finalized`` the commit task has finalized the round and neither dropped its plan and shard
             results nor asked for a checkpoint's compaction yet;
``compact``  the compaction has written the snapshot object and not recorded it yet;
``secure_shard`` a secure round's unmask shard task has written its object and not recorded
             ``shard_done`` yet;
``secure_publish`` a secure round's commit (every unmask shard done) has written the manifest and not
             finalized yet.

Every arrival at an enabled hook is counted in Redis with the pid of the process (see
:func:`arrivals`; tests wait on Redis, not on log buffering) and logged. The subject of an
arrival is the round (``plan``, ``commit``, ``finalized``, ``compact``, ``secure_publish``), ``round:shard``
(``shard``, ``secure_shard``), or the client id (``pump``, ``ingest``). Variables (read only here):

``CHORUS_FAULT_PAUSE=point[=S],...``
    The first arrival of each subject at ``point`` pauses up to S seconds (default 120), or
    until a test calls :func:`release` for that subject: a window to kill the process in.
``CHORUS_FAULT_COUNT=point,...``
    Count arrivals at ``point`` without pausing.
``CHORUS_FAULT_BARRIER=point=N,...``
    Every arrival at ``point`` waits there until N arrivals of its subject (at most 60 s):
    N concurrent runs of one step, deterministically.
``CHORUS_FAULT_ROUNDS=1,2``
    The rounds the round-based hooks apply to (default: round 1 only).
``CHORUS_FAULT_SHARDS=0,3``
    The shards whose first arrival pauses (default: every shard; arrivals are counted for all).
``CHORUS_FAULT_CLIENTS=c0``
    The clients whose first arrival at ``pump`` or ``ingest`` pauses (default: every client).
``CHORUS_FAULT_FEDERATIONS=a,b``
    The federations whose arrivals pause (default: every federation).
``CHORUS_FAULT_REDELIVER=reject-first|run-twice`` (tasks in ``CHORUS_FAULT_REDELIVER_TASKS``,
    default every round-path task: ingest, round, shard, commit)
    ``reject-first``: ``Reject(requeue=True)`` unless the delivery is a redelivery, so only a
    redelivered copy runs. ``run-twice``: run, then ``Reject(requeue=True)`` unless redelivered,
    so every task runs twice.
``CHORUS_FAULT_VISIBILITY_TIMEOUT=S``
    The broker's visibility timeout, set below the task time limits (the misconfiguration
    Settings refuses): Redis redelivers tasks that are still running.
``CHORUS_FAULT_RESTORE_INTERVAL=S``
    How often kombu looks for unacked messages past the visibility timeout.
``CHORUS_FAULT_RETRY_DELAY=S``
    The tasks' ``default_retry_delay``: the countdown of the retry after a lost pool child.
``CHORUS_FAULT_NO_S3_BACKOFF=1``
    S3 requests are retried without sleeping (which errors are retried, and how often, is unchanged).
    (A stalled request times out quickly with the real setting ``CHORUS_S3_READ_TIMEOUT``.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

# Only what tests import (fault_key, arrivals, release) is light: the worker's modules load in install().

log = logging.getLogger("chorus.faults")
ENV = os.environ.get

POINTS = ("pump", "ingest", "plan", "shard", "commit", "finalized", "compact", "secure_shard", "secure_publish")
#: the round-path tasks the redelivery faults apply to by default
ROUND_TASKS = ("chorus.ingest", "chorus.round", "chorus.shard", "chorus.commit")


def fault_key(point: str, federation: str, subject: object) -> str:
    """Redis list of the pids of the arrivals of ``subject`` at hook ``point``; ``:release`` ends its pause."""
    assert point in POINTS, point
    return f"chorus:test:fault:{point}:{federation}:{subject}"


def arrivals(redis, point: str, federation: str, subject: object) -> list[int]:
    """The pids of every arrival of ``subject`` at ``point`` so far, in order."""
    return [int(pid) for pid in redis.lrange(fault_key(point, federation, subject), 0, -1)]


def release(redis, point: str, federation: str, subject: object) -> None:
    """End the pause of ``subject`` at ``point`` (now, or as soon as it arrives)."""
    redis.set(fault_key(point, federation, subject) + ":release", "1")


def _options(name: str) -> dict[str, str]:
    """``point[=value],...`` -> {point: value or ""}; unknown points fail loudly."""
    out = {}
    for part in filter(None, (ENV(name) or "").split(",")):
        point, _, value = part.partition("=")
        if point not in POINTS:
            raise RuntimeError(f"faulty_app: {name} names {point!r}; hooks are {', '.join(POINTS)}")
        out[point] = value
    return out


class Hooks:
    """What the environment asks of each hook point."""

    def __init__(self) -> None:
        self.pause = {p: float(v or 120) for p, v in _options("CHORUS_FAULT_PAUSE").items()}
        self.barrier = {p: int(v) for p, v in _options("CHORUS_FAULT_BARRIER").items()}
        self.count = set(_options("CHORUS_FAULT_COUNT"))
        self.rounds = {int(r) for r in (ENV("CHORUS_FAULT_ROUNDS") or "1").split(",")}
        shards = ENV("CHORUS_FAULT_SHARDS")
        self.shards = None if not shards else {int(k) for k in shards.split(",")}
        clients = ENV("CHORUS_FAULT_CLIENTS")
        self.clients = None if not clients else set(clients.split(","))
        federations = ENV("CHORUS_FAULT_FEDERATIONS")
        self.federations = None if not federations else set(federations.split(","))

    def client_pauses(self, client: str) -> bool:
        return self.clients is None or client in self.clients

    def enabled(self, point: str) -> bool:
        return point in self.pause or point in self.barrier or point in self.count

    def arrive(self, redis, point: str, federation: str, subject: object, *, pausable: bool = True) -> None:
        """Count this arrival; pause the first one (until released) and hold every one at a barrier."""
        key = fault_key(point, federation, subject)
        run = redis.rpush(key, os.getpid())
        log.warning("FAULT %s-hook %s %s run %s pid %s", point, federation, subject, run, os.getpid())
        pausable = pausable and (self.federations is None or federation in self.federations)
        if point in self.pause and pausable and run == 1:
            _wait(lambda: redis.exists(key + ":release"), self.pause[point])
            log.warning("FAULT %s-pause %s %s over", point, federation, subject)
        if point in self.barrier:
            _wait(lambda: redis.llen(key) >= self.barrier[point], 60)
            log.warning("FAULT %s-barrier %s %s passed", point, federation, subject)


def _wait(done: Callable[[], Any], timeout: float) -> None:
    """Poll ``done`` for up to ``timeout`` s; a Redis restart meanwhile only makes it poll again."""
    import redis as redis_lib

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if done():
                return
        except (redis_lib.ConnectionError, redis_lib.TimeoutError):
            pass
        time.sleep(0.05)


def _target(module: Any, name: str, params: tuple[str, ...]) -> Callable[..., Any]:
    """The production function ``module.name``, checked to still take ``params`` (fail loudly if it moved)."""
    fn = getattr(module, name, None)
    if fn is None:
        raise RuntimeError(f"faulty_app: {module.__name__}.{name} is gone; move the fault hook with it")
    got = tuple(inspect.signature(fn).parameters)[: len(params)]
    if got != params:
        raise RuntimeError(f"faulty_app: {module.__name__}.{name}{got} no longer takes {params}; update the hook")
    return fn


@contextlib.contextmanager
def _before(obj: Any, method: str, hook: Callable[..., None]) -> Iterator[None]:
    """Within the block, ``obj.method(*args)`` first calls ``hook(*args)`` (an instance attribute, removed after)."""
    original = getattr(obj, method)

    @functools.wraps(original)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        hook(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(obj, method, hooked)
    try:
        yield
    finally:
        delattr(obj, method)


def _client_of(raw: Any) -> str:
    try:
        return str(json.loads(raw)["client_id"]) if isinstance(raw, str) else str(raw["client_id"])
    except (ValueError, KeyError, TypeError):
        return "unparsable"


def _hook_after_shard(hooks: Hooks, point: str, module: Any, name: str, params: tuple[str, ...]) -> None:
    """Replace ``module.name`` (computing shard ``k`` of round ``r``, its result naming the shard's adapter object)
    by a function that arrives at ``point`` (subject ``"r:k"``) once the shard's object is written."""
    compute = _target(module, name, params)

    def compute_then_hook(rt: Any, federation: str, r: int, k: int, *rest: Any) -> Any:
        result = compute(rt, federation, r, k, *rest)
        if r in hooks.rounds:
            if not rt.store.exists(result.adapter.key):
                raise RuntimeError(f"faulty_app: the {point} hook runs before the shard's objects are written")
            pausable = hooks.shards is None or k in hooks.shards
            hooks.arrive(rt.redis, point, federation, f"{r}:{k}", pausable=pausable)
        return result

    setattr(module, name, compute_then_hook)


def _before_finalize(hooks: Hooks, point: str, rt: Any) -> Callable[..., None]:
    """A hook for ``RoundState.finalize``: arrive at ``point`` (subject the round) once the manifest is written."""
    from chorus_mq.layout import manifest_key

    def before_finalize(fed: str, r: int, *args: Any, **kwargs: Any) -> None:
        if not rt.store.exists(manifest_key(fed, r)):
            raise RuntimeError(f"faulty_app: the {point} hook runs before the manifest is written")
        if r in hooks.rounds:
            hooks.arrive(rt.redis, point, fed, r)

    return before_finalize


def _install_hooks(hooks: Hooks) -> None:
    from chorus_mq.state import RoundState
    from chorus_mq.workers import commit, compact, ingest, plan, pump, shard

    # the transitions the ingest, commit and compaction hooks run just before
    _target(RoundState, "register", ("self", "federation", "r", "record"))
    _target(RoundState, "finalize", ("self", "federation", "r", "epoch", "manifest_key", "manifest_sha"))
    _target(RoundState, "add_snapshot", ("self", "federation", "record"))
    _target(RoundState, "forget_round_work", ("self", "federation", "r"))

    if hooks.enabled("pump"):
        handle = _target(pump.InboxPump, "_handle", ("self", "inbox", "entry"))

        def hook_then_handle(self, inbox, entry):
            client = _client_of(entry.record)
            hooks.arrive(self.rt.redis, "pump", entry.federation, client, pausable=hooks.client_pauses(client))
            return handle(self, inbox, entry)

        pump.InboxPump._handle = hook_then_handle

    if hooks.enabled("ingest"):
        run_ingest = _target(ingest, "ingest", ("rt", "federation", "inbox_client", "entry_id", "raw", "dispatch"))

        def ingest_with_hook(rt, federation, inbox_client, entry_id, raw, dispatch):
            def before_register(fed, r, record, *args, **kwargs):
                client = record.client_id
                hooks.arrive(rt.redis, "ingest", fed, client, pausable=hooks.client_pauses(client))

            with _before(rt.state, "register", before_register):
                return run_ingest(rt, federation, inbox_client, entry_id, raw, dispatch)

        ingest.ingest = ingest_with_hook

    if hooks.enabled("plan"):
        make_plan = _target(plan, "make_plan", ("rt", "federation", "r"))

        def plan_then_hook(rt, federation, r):
            result = make_plan(rt, federation, r)
            if r in hooks.rounds:
                hooks.arrive(rt.redis, "plan", federation, r)
            return result

        plan.make_plan = plan_then_hook

    if hooks.enabled("shard"):
        _hook_after_shard(hooks, "shard", shard, "compute_shard", ("rt", "federation", "r", "k", "plan", "config"))

    if hooks.enabled("commit"):
        commit_round = _target(commit, "commit_round", ("rt", "federation", "r", "epoch", "dispatch"))

        def commit_with_hook(rt, federation, r, epoch, dispatch):
            with _before(rt.state, "finalize", _before_finalize(hooks, "commit", rt)):
                return commit_round(rt, federation, r, epoch, dispatch)

        commit.commit_round = commit_with_hook

    if hooks.enabled("finalized"):
        _target(RoundState, "forget_round_work", ("self", "federation", "r"))
        commit_then = _target(commit, "commit_round", ("rt", "federation", "r", "epoch", "dispatch"))

        def commit_with_finalized_hook(rt, federation, r, epoch, dispatch):
            def before_forget(fed, r_, *args, **kwargs):
                if rt.state.round(fed, r_).state != "complete":
                    raise RuntimeError("faulty_app: the finalized hook runs before the round is finalized")
                if r_ in hooks.rounds:
                    hooks.arrive(rt.redis, "finalized", fed, r_)

            with _before(rt.state, "forget_round_work", before_forget):
                return commit_then(rt, federation, r, epoch, dispatch)

        commit.commit_round = commit_with_finalized_hook

    if hooks.enabled("compact"):
        run_compact = _target(compact, "compact", ("rt", "federation", "upto"))

        def compact_with_hook(rt, federation, upto):
            def before_record(fed, record, *args, **kwargs):
                if not rt.store.exists(record.key):
                    raise RuntimeError("faulty_app: the compaction hook runs before the snapshot is written")
                if record.round in hooks.rounds:
                    hooks.arrive(rt.redis, "compact", fed, record.round)

            with _before(rt.state, "add_snapshot", before_record):
                return run_compact(rt, federation, upto)

        compact.compact = compact_with_hook

    if hooks.enabled("secure_shard"):
        from chorus_mq.workers import secure_sum

        params = ("rt", "federation", "r", "k", "plan", "pub")
        _hook_after_shard(hooks, "secure_shard", secure_sum, "compute_secure_shard", params)

    if hooks.enabled("secure_publish"):
        from chorus_mq.workers import secure_sum

        commit_secure = _target(secure_sum, "commit_secure", ("rt", "federation", "r", "epoch"))

        def commit_secure_with_hook(rt, federation, r, epoch):
            with _before(rt.state, "finalize", _before_finalize(hooks, "secure_publish", rt)):
                return commit_secure(rt, federation, r, epoch)

        secure_sum.commit_secure = commit_secure_with_hook


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


def _patch_boto(no_backoff: bool) -> None:
    if no_backoff:
        from chorus_mq.store.s3 import S3Transport

        S3Transport.delay = lambda self, attempt: 0.0


def install() -> None:
    """Apply every fault the environment asks for to the app the CLI will start."""
    from chorus_mq.settings import get_settings
    from chorus_mq.workers import app as app_module

    get_app = _target(app_module, "get_app", ("settings",))
    app = get_app(get_settings())

    def same_app(settings):  # the CLI must start the app these faults were applied to
        started = get_app(settings)
        if started is not app:
            raise RuntimeError("faulty_app: the CLI built another Celery app than the one the faults patched")
        return started

    app_module.get_app = same_app
    _install_hooks(Hooks())
    if ENV("CHORUS_FAULT_REDELIVER"):
        names = (ENV("CHORUS_FAULT_REDELIVER_TASKS") or ",".join(ROUND_TASKS)).split(",")
        _patch_redeliver(app, ENV("CHORUS_FAULT_REDELIVER"), names)
    _patch_transport(app, ENV("CHORUS_FAULT_VISIBILITY_TIMEOUT"), ENV("CHORUS_FAULT_RESTORE_INTERVAL"))
    if ENV("CHORUS_FAULT_RETRY_DELAY"):
        for name in ROUND_TASKS:
            app.tasks[name].default_retry_delay = float(ENV("CHORUS_FAULT_RETRY_DELAY"))
    _patch_boto(bool(ENV("CHORUS_FAULT_NO_S3_BACKOFF")))


if __name__ == "__main__":
    from chorus_mq.cli import main

    install()
    main(prog_name="chorus-mq")
