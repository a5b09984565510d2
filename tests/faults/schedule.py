"""Seeded random fault schedules over a real topology, for tests/faults/test_fault_schedule.py.

A schedule is a list of :class:`Fault` ``(at, kind, target, hold)`` drawn from one seed: at ``at``
seconds into the run, do ``kind`` to ``target`` and undo it ``hold`` seconds later (restart what was
killed, SIGCONT what was stopped). :class:`Chaos` applies a schedule to a
:class:`tests.topology.Deployment` (one worker per role, a beat) and its redis-server, each fault on
a thread of its own (faults on one target take turns), and keeps a trace of what it did when. A hook
fault (``kind`` ending in ``_at``) waits for a task to arrive at a hook of tests/faults/faulty_app
(paused between two lines) and strikes there. Client faults are taken by the clients themselves
(:class:`Uploader`): the upload a client starts at or after ``at`` dies at the named stage, and the
client starts again ``hold`` seconds later, as a restarted client would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis as redis_lib

from chorus_mq.client import ChorusClient
from chorus_mq.messages import IngestMessage
from chorus_mq.names import EventType, RoundStatus, WorkerRole
from chorus_mq.state import EventLog

from ..topology import Deployment, wait_for
from .faulty_app import arrivals, release
from .invariants import Accepted

#: the worker roles a schedule targets (one worker process of each)
ROLES = (WorkerRole.INGEST, WorkerRole.AGGREGATE, WorkerRole.COMPACT)
#: where a client dies: after its delta's S3 PUT, before the XADD of its record ("put"); after the
#: XADD, before it sees the verdict ("xadd")
STAGES = ("put", "xadd")
#: fault kinds at a time offset, each with its draw weight
KINDS = {
    "kill": 3,  # SIGKILL a worker's process group (main process and pool child); a new one after hold
    "stop": 2,  # SIGSTOP a worker's process group; SIGCONT after hold
    "kill_child": 2,  # SIGKILL a worker's pool child (the worker forks another)
    "stop_child": 1,  # SIGSTOP a worker's pool child; SIGCONT after hold
    "kill_beat": 1,  # SIGKILL the beat; a new one after hold
    "kill_redis": 2,  # SIGKILL redis-server; restarted on its AOF after hold
    "kill_client": 3,  # a client dies at a stage of an upload; restarts after hold
    # on arrival at a hook of tests/faults/faulty_app (a task paused between two lines), from ``at`` on:
    "kill_at": 3,  # SIGKILL the whole worker holding the task; a new one after hold
    "kill_child_at": 1,  # SIGKILL only the pool child running the task
    "redis_at": 2,  # SIGKILL redis-server under the task, which goes on while Redis is down; restarted after hold
}
#: hook point -> the role of the worker that arrives there
HOOK_ROLES = {
    "ingest": WorkerRole.INGEST,  # subject: the client (its first ingest)
    "plan": WorkerRole.AGGREGATE,  # subject: the round
    "shard": WorkerRole.AGGREGATE,  # subject: "round:0" (shard 0)
    "commit": WorkerRole.AGGREGATE,
    "finalized": WorkerRole.AGGREGATE,
    "compact": WorkerRole.COMPACT,  # subject: a checkpoint round
}
#: how long a task waits at a hook for its fault before it goes on by itself; at a point with a
#: ``redis_at`` fault, REDIS_PAUSE_S (< the fault's hold: the task goes on while Redis is down)
HOOK_PAUSE_S = 10
REDIS_PAUSE_S, REDIS_HOLD_S = 2, 3.0
#: a hook fault gives up this long after the clients are done (the last round and a compaction follow them)
QUIET_S = 12


@dataclasses.dataclass(frozen=True)
class Fault:
    at: float  # seconds after the run started (a hook fault: armed from then on)
    kind: str
    target: str  # a worker role, "beat", "redis", a client id, or "point:subject" for a hook fault
    hold: float  # seconds until undone (restart, SIGCONT, the client's restart)
    stage: str = ""  # kill_client only: one of STAGES

    @property
    def hook(self) -> tuple[str, str] | None:
        """(point, subject) of a hook fault, else None."""
        if not self.kind.endswith("_at"):
            return None
        point, _, subject = self.target.partition(":")
        return point, subject

    def __str__(self) -> str:
        where = f"{self.target}@{self.stage}" if self.stage else self.target
        if self.hook:
            where = f"{self.target} (on arrival)"
        return f"{self.at:5.2f}s {self.kind} {where} hold {self.hold:.1f}s"


def draw(
    seed: int,
    *,
    clients: list[str],
    rounds: int,
    checkpoints: list[int],
    window: float,
    count: tuple[int, int] = (3, 6),
) -> list[Fault]:
    """The schedule of ``seed``: ``count`` faults (inclusive range) at offsets in ``[0, window)``; at most
    one hook fault per (point, subject)."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    faults: list[Fault] = []
    hooks: set[str] = set()
    for _ in range(rng.randint(*count)):
        kind = rng.choices(kinds, weights)[0]
        at, hold = round(rng.uniform(0, window), 2), round(rng.uniform(0.5, 6.0), 1)
        if kind == "kill_client":  # early: the clients' uploads end soon after the window's middle
            faults.append(Fault(round(at / 2, 2), kind, rng.choice(clients), hold, rng.choice(STAGES)))
        elif kind in ("kill_beat", "kill_redis"):
            faults.append(Fault(at, kind, kind.removeprefix("kill_"), hold))
        elif kind.endswith("_at"):
            point = rng.choice(sorted(HOOK_ROLES))
            if point == "ingest":
                subject = rng.choice(clients)
            elif point == "compact":
                subject = str(rng.choice(checkpoints))
            else:
                subject = str(rng.randint(1, rounds)) + (":0" if point == "shard" else "")
            if f"{point}:{subject}" in hooks:
                continue
            hooks.add(f"{point}:{subject}")
            hold = max(hold, REDIS_HOLD_S) if kind == "redis_at" else hold
            faults.append(Fault(round(at / 4, 2), kind, f"{point}:{subject}", hold))
        else:
            faults.append(Fault(at, kind, str(rng.choice(ROLES)), hold))
    return sorted(faults, key=lambda f: f.at)


def hook_env(schedule: list[Fault]) -> dict[str, str]:
    """The faulty app's variables that pause the tasks the schedule's hook faults wait for."""
    hooks = [f.hook for f in schedule if f.hook]
    if not hooks:
        return {}
    under = {f.hook[0] for f in schedule if f.hook and f.kind == "redis_at"}
    rounds = {int(s.split(":")[0]) for p, s in hooks if p != "ingest"} or {1}
    clients = {s for p, s in hooks if p == "ingest"}
    return {
        "CHORUS_FAULT_PAUSE": ",".join(
            sorted({f"{p}={REDIS_PAUSE_S if p in under else HOOK_PAUSE_S}" for p, _ in hooks})
        ),
        "CHORUS_FAULT_ROUNDS": ",".join(map(str, sorted(rounds))),
        "CHORUS_FAULT_SHARDS": "0",
        # a point paused for no client pauses only the client "-" (none): the variable must name one
        "CHORUS_FAULT_CLIENTS": ",".join(sorted(clients)) or "-",
    }


def release_untargeted(redis, federation: str, schedule: list[Fault], rounds: int) -> None:
    """Let every (point, round) the pause variables cover but no fault targets pass its hook at once."""
    hooks = {f.hook for f in schedule if f.hook}
    for point in {p for p, _ in hooks} - {"ingest"}:
        for r in range(1, rounds + 1):
            subject = f"{r}:0" if point == "shard" else str(r)
            if (point, subject) not in hooks:
                release(redis, point, federation, subject)


def seeds(default: list[int]) -> list[int]:
    """``CHORUS_FAULT_SEEDS`` (``17``, ``1,5,9``, ``100..199`` or a mix: ``1,100..104``), else ``default``."""
    spec = os.environ.get("CHORUS_FAULT_SEEDS")
    if not spec:
        return default
    out: list[int] = []
    for part in spec.split(","):
        first, dots, last = part.strip().partition("..")
        out += range(int(first), int(last) + 1) if dots else [int(first)]
    return out


class Trace:
    """What happened when (seconds since the run started), for the failure report."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, text: str) -> None:
        with self._lock:
            self.lines.append(f"{self.now():6.2f}s {text}")

    def __str__(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


class ClientFaults:
    """The schedule's client faults, taken by the clients as they start uploads."""

    def __init__(self, schedule: list[Fault]):
        self._pending = [f for f in schedule if f.kind == "kill_client"]
        self._lock = threading.Lock()

    def take(self, client: str, now: float) -> Fault | None:
        with self._lock:
            for fault in self._pending:
                if fault.target == client and fault.at <= now:
                    self._pending.remove(fault)
                    return fault
        return None

    def untaken(self) -> list[Fault]:
        with self._lock:
            return list(self._pending)


class Chaos:
    """One worker per role and a beat, and the faults of a schedule applied to them and to Redis.

    Every fault runs on a thread of its own (faults overlap); faults on one target (a role, the
    beat, Redis) take turns, each holding the target until it is undone.
    """

    def __init__(self, dep: Deployment, redis_server, federation: str, trace: Trace):
        self.dep, self.redis_server, self.federation, self.trace = dep, redis_server, federation, trace
        self.workers = {str(role): self._start(role) for role in ROLES}
        self.beat = dep.start_beat(wait=False)
        self._locks = {name: threading.Lock() for name in [*self.workers, "beat", "redis"]}
        self._threads: list[threading.Thread] = []
        self._limit = 0.0
        dep.wait_ready(*self.workers.values())
        wait_for(lambda: "beat: sweeping every" in dep.log(self.beat), 90, "the beat to start")

    def _start(self, role: WorkerRole | str):
        return self.dep.start_worker(role=role, faulty=True, wait=False)

    def supervise(self, stop: threading.Event) -> None:
        """What the compose file's ``restart: unless-stopped`` does, until ``stop``: a worker that exited by
        itself (no fault holds its role down) is started again."""
        while not stop.wait(1.0):
            for role in list(self.workers):
                if self.workers[role].poll() is None or not self._locks[role].acquire(blocking=False):
                    continue
                try:
                    proc = self.workers[role]
                    if proc.poll() is not None:
                        self.workers[role] = self._start(role)
                        self.trace(f"{role} worker exited by itself (code {proc.returncode}); restarted by policy")
                finally:
                    self._locks[role].release()

    def start(self, schedule: list[Fault], quiet: Callable[[], bool], limit: float) -> None:
        """Start applying the schedule's process and Redis faults; ``quiet()``: the clients are done (a
        hook fault whose task has not arrived QUIET_S after that, or ``limit`` s into the run, gives up)."""
        self._limit = limit
        for fault in schedule:
            if fault.kind != "kill_client":
                thread = threading.Thread(target=self._run, args=(fault, quiet), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _run(self, fault: Fault, quiet: Callable[[], bool]) -> None:
        time.sleep(max(0.0, fault.at - self.trace.now()))
        try:
            if fault.hook:
                self._at_hook(fault, quiet)
            else:
                self._apply(fault)
        except Exception as exc:  # a fault that cannot land (a process gone) is noted, not fatal
            self.trace(f"fault {fault} did not land: {exc!r}")

    def _at_hook(self, fault: Fault, quiet: Callable[[], bool]) -> None:
        point, subject = fault.hook  # type: ignore[misc]
        role = str(HOOK_ROLES[point])
        pid = self._arrival(point, subject, quiet)
        if pid is None:
            self.trace(f"fault {fault}: nothing arrived at {point} {subject}; released")
            self._release(point, subject)
            return
        self.trace(f"fault {fault}: pid {pid} arrived")
        if fault.kind == "redis_at":  # the task goes on REDIS_PAUSE_S after its arrival, Redis still down
            with self._locks["redis"]:
                self._kill_redis(fault.hold)
            return
        with self._locks[role]:
            worker = self.workers[role]
            if fault.kind == "kill_child_at":
                if pid == worker.pid or pid not in {c.pid for c in psutil.Process(worker.pid).children()}:
                    self.trace(f"pid {pid} is no pool child of the {role} worker now; not signalled")
                    return
                os.kill(pid, signal.SIGKILL)
                self._release(point, subject)
                return
            self.dep.kill(worker)
            time.sleep(fault.hold)
            self.workers[role] = self._start(role)
            self.trace(f"{role} worker restarted")
            self._release(point, subject)

    def _arrival(self, point: str, subject: str, quiet: Callable[[], bool]) -> int | None:
        """The pid of the first arrival of ``subject`` at ``point``; None once the clients have been done QUIET_S."""
        quiet_since = None
        while True:
            try:
                pids = arrivals(self.dep.redis(), point, self.federation, subject)
                if pids:
                    return pids[0]
            except (redis_lib.ConnectionError, redis_lib.TimeoutError):
                pass  # Redis is away (another fault): look again
            if quiet():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > QUIET_S:
                    return None
            if self.trace.now() > self._limit:
                return None
            time.sleep(0.05)

    def _release(self, point: str, subject: str) -> None:
        with contextlib.suppress(redis_lib.ConnectionError, redis_lib.TimeoutError):
            release(self.dep.redis(), point, self.federation, subject)

    def _kill_redis(self, hold: float) -> None:
        self.redis_server.stop(sig_kill=True)
        time.sleep(hold)
        self.redis_server.start()
        self.trace("redis-server restarted on its AOF")

    def _apply(self, fault: Fault) -> None:
        kind, target = fault.kind, fault.target
        with self._locks[target]:
            self.trace(f"fault {fault}")
            if kind == "kill_redis":
                self._kill_redis(fault.hold)
            elif kind == "kill_beat":
                self.dep.kill(self.beat)
                time.sleep(fault.hold)
                self.beat = self.dep.start_beat(wait=False)
                self.trace("beat restarted")
            elif kind == "kill":
                self.dep.kill(self.workers[target])
                time.sleep(fault.hold)
                self.workers[target] = self._start(target)
                self.trace(f"{target} worker restarted")
            elif kind == "stop":
                self._pause(lambda sig: self.dep.kill(self.workers[target], sig), fault.hold)
            else:  # kill_child, stop_child
                children = psutil.Process(self.workers[target].pid).children()
                if not children:
                    self.trace(f"{target} worker has no pool child yet: nothing to signal")
                    return
                child = children[0]
                self.trace(f"{target} pool child pid {child.pid}")
                if kind == "kill_child":
                    child.send_signal(signal.SIGKILL)
                else:
                    self._pause(child.send_signal, fault.hold)

    def _pause(self, send, hold: float) -> None:
        send(signal.SIGSTOP)
        try:
            time.sleep(hold)
        finally:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                send(signal.SIGCONT)
        self.trace("resumed")

    def restore(self) -> None:
        """Wait for every fault to be undone; then every service back: Redis up, a live worker per role,
        a live beat, all ready."""
        for thread in self._threads:
            thread.join()
        if self.redis_server.proc is None:
            self.redis_server.start()
        for role, proc in list(self.workers.items()):
            if proc.poll() is not None:
                self.workers[role] = self._start(role)
        if self.beat.poll() is not None:
            self.beat = self.dep.start_beat(wait=False)
        self.dep.wait_ready(*self.workers.values())
        wait_for(lambda: "beat: sweeping every" in self.dep.log(self.beat), 90, "the beat to start")
        self.trace("every service back")


class _Stage(Exception):
    """The SDK's upload reached :meth:`ChorusClient.submit`: its delta is in the store, its record not sent."""

    def __init__(self, msg: IngestMessage):
        self.msg = msg


class Uploader:
    """One registered client: uploads its delta of each round, dies where its faults say, tries again.

    ``xadded``: the upload ids of every record this client's XADD returned for (they reached its inbox);
    ``unsure``: those whose XADD raised (Redis went away: in the inbox or not). ``accepted``: the
    acceptances it saw.
    """

    def __init__(
        self,
        sdk: ChorusClient,
        federation: str,
        client: str,
        deltas: dict[int, Path],
        dataset_size: float,
        faults: ClientFaults,
        trace: Trace,
        *,
        verdict_wait: float,
    ):
        self.sdk, self.federation, self.client = sdk, federation, client
        self.deltas, self.dataset_size, self.faults, self.trace = deltas, dataset_size, faults, trace
        self.verdict_wait = verdict_wait
        self.xadded: list[str] = []
        self.unsure: list[str] = []
        self.accepted: list[Accepted] = []
        self.errors: list[str] = []
        self.done: dict[int, bool] = {}

    def run(self, rounds: list[int], think: list[float], deadline: Callable[[], float]) -> None:
        """Upload round by round (after ``think`` seconds each) until registered, or until ``deadline()``."""
        for r, pause in zip(rounds, think, strict=True):
            self.done[r] = self._round(r, pause, deadline)

    def _round(self, r: int, pause: float, deadline: Callable[[], float]) -> bool:
        state = self.sdk.state
        opened = False
        while time.monotonic() < deadline():
            try:
                current = state.current_round(self.federation)
                if current < r:
                    time.sleep(0.1)
                    continue
                if not opened:
                    opened = True
                    time.sleep(pause)  # the client's own pace: faults land at different stages
                if state.registered_sha(self.federation, r, self.client) is not None:
                    return True
                if state.round(self.federation, r).state != RoundStatus.OPEN:
                    self.trace(f"{self.client}: round {r} ended without it")
                    return False
                self._attempt(r)
            except Exception as exc:  # Redis or S3 away: the client tries again, as a user would
                self.errors.append(f"{self.trace.now():.2f}s {exc!r}")
                time.sleep(0.5)
        return False

    def _attempt(self, r: int) -> None:
        fault = self.faults.take(self.client, self.trace.now())
        msg = self._put(r)
        if fault is not None and fault.stage == "put":
            self.trace(f"{self.client} killed after the PUT of round {r}'s delta (fault {fault})")
            time.sleep(fault.hold)
            return
        log = EventLog(self.sdk.redis, self.federation)
        after = log.last_id()
        try:
            self.sdk.submit(msg, wait=False)
        except Exception:
            self.unsure.append(msg.upload_id)
            raise
        self.xadded.append(msg.upload_id)
        if fault is not None:
            self.trace(f"{self.client} killed after the XADD of upload {msg.upload_id} (fault {fault})")
            time.sleep(fault.hold)
            return
        for event in log.follow(after, deadline=time.monotonic() + self.verdict_wait):
            if event is None or event.fields.get("upload_id") != msg.upload_id:
                continue
            if event.type == EventType.DELTA_ACCEPTED:
                self.accepted.append(Accepted(self.client, event.round, msg.sha256))
            else:
                self.trace(f"{self.client}: upload {msg.upload_id} {event.type}: {event.fields.get('reason')}")
            return
        self.trace(f"{self.client}: no verdict for upload {msg.upload_id} in {self.verdict_wait:.0f}s; again")

    def _put(self, r: int) -> IngestMessage:
        """The SDK's own upload up to the record it would append: the delta is PUT, the record returned."""

        def stop(msg: IngestMessage, **_kwargs) -> None:
            raise _Stage(msg)

        self.sdk.submit = stop  # type: ignore[method-assign]
        try:
            self.sdk.upload(self.federation, self.deltas[r], self.client, dataset_size=self.dataset_size, round_=r)
        except _Stage as stage:
            return stage.msg
        finally:
            del self.sdk.submit
        raise AssertionError("the SDK's upload never reached submit")
