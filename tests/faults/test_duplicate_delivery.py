"""Fault 2: the broker delivers a task more than once.

(a) A visibility timeout shorter than the aggregation, two workers: Redis hands the running
    aggregation to the second worker, and both runs are held at a barrier until both are in
    flight: two concurrent runs of one aggregation, one result.
(b) Celery's reject-and-requeue trick on every ingest and aggregation: ``reject-first`` runs
    only the redelivered copy; ``run-twice`` runs the task, then requeues it so it runs again.
"""

from __future__ import annotations

import re

import psutil
import pytest

from ..topology import wait_for
from .conftest import size_of, timing, trials, upload, wait_hook, wait_round
from .invariants import assert_exactly_once

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
    for w in workers:
        wait_for(lambda w=w: "ready." in deployment.log(w), 90, f"{w.name} ready")
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
