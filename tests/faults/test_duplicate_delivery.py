"""Fault 2: the broker delivers a task more than once.

(a) A visibility timeout shorter than the round's tasks, two workers: Redis hands the running
    shard to the second worker, and both runs are held at a barrier until both are in flight;
    then the same for the commit (both hold the manifest and race to finalize): two concurrent
    runs of each step, one result.
(b) Celery's reject-and-requeue trick on every ingest, round, shard and commit task:
    ``reject-first`` runs only the redelivered copy; ``run-twice`` runs the task, then requeues
    it so it runs again.
(c) An ingest record delivered again after its round completed (a late redelivery).
"""

from __future__ import annotations

import collections
import hashlib
import re

import pytest

from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.names import EventType

from ..topology import wait_for
from .conftest import (
    MARKS,
    federation,
    size_of,
    timing,
    trials,
    upload,
    upload_all,
    wait_hook,
    wait_round,
    worker_of,
)
from .faulty_app import ROUND_TASKS
from .invariants import Accepted, assert_exactly_once

pytestmark = MARKS


def _logs(dep, procs) -> str:
    return "".join(dep.log(p) for p in procs)


def _results(log: str, task: str) -> list[str]:
    """What each run of ``task`` returned, from the workers' "Task ... succeeded" lines."""
    return re.findall(rf"Task {re.escape(task)}\[\S+\] succeeded in \S+: '?([\w/ ]+)'?", log)


@trials(2)
def test_visibility_timeout_shorter_than_the_round_two_workers(deployment, delta_file, trial):
    fed = f"vt-{trial}"
    # Settings are valid (soft < hard < visibility); the faulty app then lowers the broker's
    # visibility timeout below the held steps' duration, which Settings would refuse.
    deployment.env.update(
        timing(20, 25, 30, 40),
        CHORUS_FAULT_VISIBILITY_TIMEOUT="2",
        CHORUS_FAULT_RESTORE_INTERVAL="0.5",
        CHORUS_FAULT_BARRIER="shard=2,commit=2",
    )
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    workers = [deployment.start_worker(faulty=True, wait=False) for _ in range(2)]
    deployment.wait_ready(*workers)
    accepted = upload_all(sdk, fed, range(3), delta_file)

    for point, subject in (("shard", "1:0"), ("commit", 1)):
        runs = [wait_hook(deployment, point, fed, subject, run) for run in (1, 2)]  # the second: the redelivery
        owners = {worker_of(deployment, pid).pid for pid in runs}
        assert len(owners) == 2, f"both workers should run the {point} at once"
    assert wait_round(deployment, fed, 1) == "complete"
    log = wait_for(
        lambda: len(re.findall(r"finalize: (\w+)", text := _logs(deployment, workers))) >= 2 and text,
        30,
        "both commits to finalize",
    )
    finals = re.findall(r"finalize: (\w+)", log)
    assert finals.count("ok") == 1 and "already" in finals, finals
    shards = wait_for(
        lambda: len(s := _results(_logs(deployment, workers), "chorus.shard")) >= 2 and s, 30, "both shard runs to end"
    )
    # one result recorded, the other run found it there (a later redelivery finds the shard done)
    assert (
        shards.count("recorded") == 1
        and "duplicate" in shards
        and set(shards) <= {"recorded", "duplicate", "done", "stale"}
    ), shards

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]}


@trials(2)
@pytest.mark.parametrize("mode", ["reject-first", "run-twice"])
def test_reject_and_requeue_every_task(deployment, delta_file, mode, trial):
    fed = f"requeue-{mode}-{trial}"
    deployment.env.update(timing(20, 25, 30, 40), CHORUS_FAULT_REDELIVER=mode)
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    worker = deployment.start_worker(faulty=True, concurrency=2)
    accepted = []
    for r in (1, 2):
        accepted += upload_all(sdk, fed, range(3 * r - 3, 3 * r), delta_file)
        assert wait_round(deployment, fed, r) == "complete"

    def settled() -> str | None:  # every requeued message ran again, to the end
        log = deployment.log(worker)
        requeued = collections.Counter(re.findall(r"FAULT reject-requeue (\S+)\[", log))
        rerun = collections.Counter(re.findall(r"FAULT delivery (\S+)\[\S+\] redelivered=True", log))
        ran = sum(len(re.findall(rf"Task {re.escape(task)}\[\S+\] succeeded", log)) for task in ROUND_TASKS)
        return log if requeued == rerun and ran == sum(rerun.values()) and requeued["chorus.commit"] >= 2 else None

    log = wait_for(settled, 30, "the redeliveries")
    requeued = collections.Counter(re.findall(r"FAULT reject-requeue (\S+)\[", log))
    assert requeued["chorus.ingest"] == 6 and requeued["chorus.round"] == 2
    assert requeued["chorus.shard"] >= 2 and requeued["chorus.commit"] >= 2  # a rerun round task may enqueue again
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
    duplicates = [e["client"] for e in report.events if e["type"] == EventType.DELTA_ACCEPTED and e.get("duplicate")]
    # run-twice: the second run of each ingest found its delta registered, a no-op announced as a duplicate
    assert sorted(duplicates) == ([f"c{i}" for i in range(6)] if mode == "run-twice" else [])


@trials(2)
def test_record_delivered_again_after_its_round_completed(deployment, delta_file, trial):
    """A copy of an ingest record (no round given) that arrives after its round moved on, as a
    redelivery past the visibility timeout does: it is the same upload, already counted, and must
    not be registered again in the round that is open by then."""
    fed = f"late-{trial}"
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=2)
    deployment.start_worker()
    messages = []
    for i in range(2):
        data = delta_file(i).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        sdk.store.put_bytes(delta_key(fed, f"c{i}", sha), data)
        messages.append(
            IngestMessage(federation=fed, client_id=f"c{i}", sha256=sha, size=len(data), dataset_size=size_of(i))
        )
    accepted = [Accepted(m.client_id, res.round, m.sha256) for m in messages for res in [sdk.submit(m, timeout=60)]]
    assert wait_round(deployment, fed, 1) == "complete"

    again = sdk.submit(messages[1], timeout=60)  # the very same record, appended again
    assert (again.status, again.round) == ("duplicate", 1)
    accepted.append(upload(sdk, fed, "c2", delta_file(2), size_of(2)))  # round 2 goes on normally
    assert sdk.status(fed).deltas == 1
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"]} and report.pending == {2: ["c2"]}
