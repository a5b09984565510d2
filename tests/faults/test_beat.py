"""Fault 6: more than one scheduler sweeps the deadlines at once.

Two ``chorus-mq beat`` processes (redbeat holds a lock; one schedules, the other waits) and
rounds with a 1 s deadline and a min-quorum of 2, so only the sweep closes them:

* round 1: both beats running;
* round 2: the lock holder SIGKILLed, the standby takes over once the lock expires;
* round 3: at the deadline, 8 threads call ``close_due_rounds`` together, racing the beat.

Each round is closed exactly once and aggregated exactly once.
"""

from __future__ import annotations

import threading
import time

import pytest

from chorus_mq.workers import dispatch
from chorus_mq.workers.runtime import Runtime
from chorus_mq.workers.sweep import close_due_rounds

from ..topology import wait_for
from .conftest import in_threads, size_of, timing, trials, upload, wait_round
from .invariants import assert_exactly_once

pytestmark = pytest.mark.faults

THREADS = 8


def _sweep_together(dep, n: int) -> list[dict]:
    """``close_due_rounds`` from ``n`` threads released at once, each with its own connections."""
    settings = dep.settings()
    runtimes = [Runtime.from_settings(settings) for _ in range(n)]
    barrier = threading.Barrier(n)
    reports: list[dict] = []

    def go(rt):
        barrier.wait()
        reports.append(close_due_rounds(rt, lambda f, r, e: dispatch.aggregate(settings, f, r, e)))

    in_threads(go, [(rt,) for rt in runtimes])
    return reports


@trials(2)
def test_two_beats_and_concurrent_sweeps_close_each_round_once(deployment, delta_file, trial):
    fed = f"beat-{trial}"
    deployment.env.update(timing(8, 10, 30, 40), CHORUS_SWEEP_INTERVAL="0.3", CHORUS_BEAT_LOCK_TIMEOUT="3")
    worker = deployment.start_worker(wait=False)
    beats = [deployment.start_beat() for _ in range(2)]
    sdk = deployment.sdk()
    sdk.create_federation(fed, base_model="tiny", quorum=100, round_timeout=1, min_quorum=2)
    deployment.wait_ready(worker)
    holder = wait_for(lambda: [b for b in beats if "beat: Acquired lock" in deployment.log(b)], 60, "a beat to lead")
    assert len(holder) == 1, "two beats hold the redbeat lock at once"
    accepted = []

    def fill(r: int):
        accepted.extend(upload(sdk, fed, f"c{i}", delta_file(i), size_of(i)) for i in (2 * r - 2, 2 * r - 1))

    fill(1)
    assert wait_round(deployment, fed, 1) == "complete"

    deployment.kill(holder[0])  # SIGKILL: the lock is not released, it expires
    standby = next(b for b in beats if b is not holder[0])
    fill(2)
    assert wait_round(deployment, fed, 2) == "complete"
    assert "beat: Acquired lock" in deployment.log(standby)

    fill(3)
    deadline = sdk.state.round(fed, 3)["deadline"]
    time.sleep(max(0.0, deadline - time.time()))  # due now: the beat's sweep and the threads race
    reports = _sweep_together(deployment, THREADS)
    assert wait_round(deployment, fed, 3) == "complete"
    fired = [entry for rep in reports for entry in rep["fired"]]
    assert fired in ([], [(fed, 3)]), f"threads fired {fired}"

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"], 2: ["c2", "c3"], 3: ["c4", "c5"]}
    closes = [e for e in report.events if e["type"] == "round_aggregating"]
    assert [e["reason"] for e in closes] == ["deadline"] * 3
