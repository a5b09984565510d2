"""Fault 2: the broker delivers a task more than once.

(a) A visibility timeout shorter than the aggregation, two workers: Redis hands the running
    aggregation to the second worker, and both runs are held at a barrier until both are in
    flight: two concurrent runs of one aggregation, one result.
(b) Celery's reject-and-requeue trick on every ingest and aggregation: ``reject-first`` runs
    only the redelivered copy; ``run-twice`` runs the task, then requeues it so it runs again.
(c) An ingest message delivered again after its round completed (a late redelivery).
"""

from __future__ import annotations

import hashlib
import re

import psutil
import pytest

from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage

from ..topology import wait_for
from .conftest import size_of, timing, trials, upload, wait_hook, wait_round
from .invariants import Accepted, assert_exactly_once

pytestmark = pytest.mark.faults


def _logs(dep, procs) -> str:
    return "".join(dep.log(p) for p in procs)


@trials()
def test_visibility_timeout_shorter_than_aggregation_two_workers(deployment, delta_file, trial):
    fed = f"vt-{trial}"
    # Settings are valid (soft < hard < visibility); the faulty app then lowers the broker's
    # visibility timeout below the aggregation's duration, which Settings would refuse.
    deployment.env.update(timing(20, 25, 30, 40), CHORUS_FAULT_VISIBILITY_TIMEOUT="2",
                          CHORUS_FAULT_RESTORE_INTERVAL="0.5", CHORUS_FAULT_AGGREGATE_BARRIER="2")
    workers = [deployment.start_worker(faulty=True, wait=False) for _ in range(2)]
    deployment.wait_ready(*workers)
    sdk = deployment.sdk()
    sdk.create_federation(fed, base_model="tiny", quorum=3)
    accepted = [upload(sdk, fed, f"c{i}", delta_file(i), size_of(i)) for i in range(3)]

    runs = [wait_hook(deployment, fed, 1, run) for run in (1, 2)]  # the second run is the redelivery
    owners = {next(w.pid for w in workers if pid in {c.pid for c in psutil.Process(w.pid).children()})
              for pid in runs}
    assert len(owners) == 2, "both workers should run the aggregation at once"
    assert wait_round(deployment, fed, 1) == "complete"
    finals = wait_for(lambda: (f := re.findall(r"finalize: (\w+)", _logs(deployment, workers))) and len(f) >= 2
                      and f, 30, "both runs to finalize")
    assert sorted(finals)[:2] == ["already", "ok"] and finals.count("ok") == 1, finals

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]}


@trials(2)
@pytest.mark.parametrize("mode", ["reject-first", "run-twice"])
def test_reject_and_requeue_every_task(deployment, delta_file, mode, trial):
    fed = f"requeue-{mode}-{trial}"
    deployment.env.update(timing(20, 25, 30, 40), CHORUS_FAULT_REDELIVER=mode)
    worker = deployment.start_worker(faulty=True, concurrency=2)
    sdk = deployment.sdk()
    sdk.create_federation(fed, base_model="tiny", quorum=3)
    accepted = []
    for r in (1, 2):
        accepted += [upload(sdk, fed, f"c{i}", delta_file(i), size_of(i)) for i in range(3 * r - 3, 3 * r)]
        assert wait_round(deployment, fed, r) == "complete"

    # every task's redelivered copy ran to the end: 6 ingests and 2 aggregations
    log = wait_for(lambda: len(re.findall(r"Task chorus\.(?:ingest|aggregate)\[\S+\] succeeded",
                                          text := deployment.log(worker))) >= 8 and text, 30, "the redeliveries")
    assert log.count("FAULT reject-requeue chorus.ingest") == 6
    assert log.count("FAULT reject-requeue chorus.aggregate") == 2
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
    duplicates = [e["client"] for e in report.events if e["type"] == "delta_accepted" and e.get("duplicate")]
    # run-twice: the second run of each ingest found its delta registered, a no-op announced as a duplicate
    assert sorted(duplicates) == ([f"c{i}" for i in range(6)] if mode == "run-twice" else [])


@trials(2)
def test_message_delivered_again_after_its_round_completed(deployment, delta_file, trial):
    """A copy of an ingest message (no round given) that arrives after its round moved on, as a
    redelivery past the visibility timeout does: it is the same upload, already counted, and must
    not be registered again in the round that is open by then."""
    fed = f"late-{trial}"
    deployment.start_worker()
    sdk = deployment.sdk()
    sdk.create_federation(fed, base_model="tiny", quorum=2)
    messages = []
    for i in range(2):
        data = delta_file(i).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        sdk.store.put_bytes(delta_key(fed, f"c{i}", sha), data)
        messages.append(IngestMessage(federation=fed, client_id=f"c{i}", object_key=delta_key(fed, f"c{i}", sha),
                                      sha256=sha, size=len(data), dataset_size=size_of(i)))
    accepted = [Accepted(m.client_id, res.round, m.sha256) for m in messages
                for res in [sdk.submit(m, timeout=60)]]
    assert wait_round(deployment, fed, 1) == "complete"

    again = sdk.submit(messages[1], timeout=60)  # the very same message, delivered again
    assert (again.status, again.round) == ("duplicate", 1)
    accepted.append(upload(sdk, fed, "c2", delta_file(2), size_of(2)))  # round 2 goes on normally
    assert sdk.status(fed)["deltas"] == 1
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"]} and report.pending == {2: ["c2"]}
