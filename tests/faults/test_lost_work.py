"""Work lost with a worker or a message, found again by the sweep (issue 15, findings 16-18).

* A task message lost from the broker (here: deleted from the Celery queue in Redis, as a Redis
  restart or a worker killed holding it loses one) costs about one lease period: the sweep sees the
  lease run out with nothing queued and re-sends the same epoch's missing task (the commit, or one
  shard). The round completes with no reclaim, its epoch and attempts unchanged.
* A compaction killed midway (its lock still held, its message parked in kombu's unacked) is asked
  again by the sweep once its lock and request expire: the snapshot is there within about a minute,
  with default timings.
* A commit killed between finalize and its clean-up leaves the round's plan and shard keys: the sweep
  collects them (two beats at once, harmlessly).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import pytest

from chorus_mq.names import EventType, Queue, RoundStatus, WorkerRole

from ..topology import wait_for
from .conftest import MARKS, WIDE, federation, size_of, timing, upload_all, wait_hook, wait_round
from .faulty_app import release
from .invariants import assert_exactly_once

pytestmark = MARKS

LEASE_S, SWEEP_S = 5, 0.5
#: a lost message's bound: the lease runs out, a sweep notices, and the re-sent task runs (plus slack for
#: process scheduling on a shared two-core machine)
LOST_BOUND_S = LEASE_S + SWEEP_S + 12
#: a killed compaction's bound with default timings (lease 30 s, sweep 5 s): its lock and request expire
COMPACTION_BOUND_S = 60


def _task_args(raw: str) -> tuple[str, list]:
    """A Celery (protocol 2) message as kombu keeps it in a Redis list: its task name and arguments."""
    message = json.loads(raw)
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return message["headers"]["task"], json.loads(body)[0]


def drop_message(redis, task: str, last_arg: int | None = None, timeout: float = 30) -> list:
    """Wait for ``task``'s message (whose last argument is ``last_arg``, if given) in the aggregate queue and
    delete it; returns its arguments."""

    def find():
        for raw in redis.lrange(Queue.AGGREGATE.value, 0, -1):
            name, args = _task_args(raw)
            if name == task and (last_arg is None or args[-1] == last_arg):
                return raw, args
        return None

    raw, args = wait_for(find, timeout, f"a {task} message in {Queue.AGGREGATE.value}")
    assert redis.lrem(Queue.AGGREGATE.value, 1, raw) == 1
    return args


@pytest.mark.parametrize("lost", ["commit", "shard"])
def test_a_lost_task_message_is_resent_without_spending_an_attempt(
    deployment, delta_file, wide_delta_file, lost, capsys
):
    fed = f"lost-{lost}"
    # the commit: one shard, paused before it records; a shard: four shards, the round task paused
    point, subject = ("shard", "1:0") if lost == "commit" else ("plan", 1)
    deployment.env.update(
        timing(8, 10, 600, LEASE_S),  # the visibility timeout is far: only the sweep can bring a message back
        CHORUS_SWEEP_INTERVAL=str(SWEEP_S),
        CHORUS_FAULT_PAUSE=f"{point}=60",
        **({"CHORUS_SHARD_BYTES": "1"} if lost == "shard" else {}),
    )
    files, modules = (delta_file, None) if lost == "commit" else (wide_delta_file, WIDE)
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3, **({"modules": modules} if modules else {}))
    ingest = deployment.start_worker(role=WorkerRole.INGEST, wait=False)
    aggregate = deployment.start_worker(role=WorkerRole.AGGREGATE, faulty=True, wait=False)
    deployment.wait_ready(ingest, aggregate)
    deployment.start_beat()
    accepted = upload_all(sdk, fed, range(3), files)

    wait_hook(deployment, point, fed, subject)
    redis = deployment.redis()
    os.kill(aggregate.pid, signal.SIGSTOP)  # its main process fetches nothing; the paused pool child goes on
    try:
        release(redis, point, fed, subject)
        if lost == "commit":
            args = drop_message(redis, "chorus.commit")
        else:
            args = drop_message(redis, "chorus.shard", last_arg=3)
        dropped = time.monotonic()
    finally:
        os.kill(aggregate.pid, signal.SIGCONT)
    assert args[:3] == [fed, 1, 1], args  # round 1, epoch 1

    assert wait_round(deployment, fed, 1, timeout=LOST_BOUND_S + 60) == "complete"
    took = time.monotonic() - dropped
    with capsys.disabled():
        print(f"\n[lost {lost} message] round complete {took:.1f}s after the message was deleted (lease {LEASE_S}s)")
    assert took <= LOST_BOUND_S, f"{took:.1f}s to recover a lost {lost} message (bound {LOST_BOUND_S}s)"
    info = sdk.state.round(fed, 1)
    assert (info.epoch, info.reclaims) == (1, 0), "a lost message must not cost an attempt"
    assert info.resends >= 1
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]} and report.reclaims == 0
    done = next(e for e in report.events if e["type"] == EventType.ROUND_COMPLETE)
    assert done["epoch"] == 1
    if lost == "shard":
        assert [s.items for s in report.manifests[1].shards] == [1, 1, 1, 1]


def test_a_compaction_killed_midway_is_retried_within_the_lease(deployment, delta_file, capsys):
    fed = "compact-retry"
    deployment.env.update(CHORUS_FAULT_PAUSE="compact=600")  # every timing at its default
    sdk = deployment.sdk()
    assert (sdk.settings.aggregation_lease, sdk.settings.sweep_interval) == (30, 5.0)
    federation(sdk, fed, quorum=3, checkpoint_every=1)  # round 1's commit asks for its snapshot
    doomed = deployment.start_worker(faulty=True)
    deployment.start_beat()
    accepted = upload_all(sdk, fed, range(3), delta_file)
    assert wait_round(deployment, fed, 1) == "complete"

    wait_hook(deployment, "compact", fed, 1)  # the snapshot object written, not recorded
    killed = time.monotonic()
    deployment.kill(doomed)  # its lock stays until it expires; its message waits in unacked for an hour
    assert sdk.state.snapshots(fed) == {} and sdk.redis.exists(sdk.state.keys(fed).compaction)
    deployment.start_worker()
    snapshot = wait_for(lambda: sdk.state.snapshots(fed).get(1), COMPACTION_BOUND_S + 60, "the snapshot of round 1")
    took = time.monotonic() - killed
    with capsys.disabled():
        print(f"\n[killed compaction] snapshot recorded {took:.1f}s after the compaction was killed")
    assert took <= COMPACTION_BOUND_S, f"{took:.0f}s to retry a killed compaction (bound {COMPACTION_BOUND_S}s)"
    assert (snapshot.base, snapshot.rounds) == (None, 1)
    assert len(sdk.store.list(f"{fed}/snapshots/")) == 1  # the retry wrote the same object
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]}


def test_work_keys_left_by_a_commit_killed_after_finalize_are_collected(deployment, delta_file):
    fed = "collect"
    deployment.env.update(CHORUS_FAULT_PAUSE="finalized=120", CHORUS_SWEEP_INTERVAL=str(SWEEP_S))
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3, checkpoint_every=0)
    doomed = deployment.start_worker(faulty=True)
    accepted = upload_all(sdk, fed, range(3), delta_file)

    wait_hook(deployment, "finalized", fed, 1)  # finalized; the plan and shard keys not dropped yet
    deployment.kill(doomed)
    redis, keys = deployment.redis(), sdk.state.keys(fed)
    assert sdk.state.round(fed, 1).state == RoundStatus.COMPLETE
    assert redis.exists(keys.plan(1)) and redis.exists(keys.shards(1)), "the dead commit left them"

    deployment.start_beat()
    deployment.start_beat()  # two sweeps at once: collecting is idempotent
    wait_for(lambda: not redis.exists(keys.plan(1), keys.shards(1)), 30, "the sweep to collect round 1's work")
    deployment.start_worker()
    accepted += upload_all(sdk, fed, range(3, 6), delta_file)  # the federation goes on
    assert wait_round(deployment, fed, 2) == "complete"
    wait_for(lambda: redis.get(keys.collected) == "3", 30, "the sweep's cursor to pass round 2")
    assert not redis.exists(keys.plan(2), keys.shards(2))
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
