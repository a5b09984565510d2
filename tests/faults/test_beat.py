"""Fault 6: the scheduler. More than one sweeps the deadlines at once; Redis restarts under one.

Two ``chorus-mq beat`` processes (plain sweep loops: no lock, both sweep every 0.3 s) and
rounds with a 1 s deadline and a min-quorum of 2, so only a sweep closes them:

* round 1: both beats sweeping;
* round 2: one beat SIGKILLed, the other goes on alone (nothing to take over);
* round 3: at the deadline, 8 threads call ``sweep`` together, racing the beat.

Each round is closed exactly once and aggregated exactly once. And a beat survives Redis
restarts (SIGKILL and SIGTERM, three in a row: celery-redbeat's beat exited for good on the
first): afterwards it still closes a round at its deadline.
"""

from __future__ import annotations

import signal
import threading
import time

from chorus_mq.names import EventType
from chorus_mq.workers.app import get_dispatcher
from chorus_mq.workers.runtime import Runtime
from chorus_mq.workers.sweep import SweepReport, sweep

from ..topology import wait_for
from .conftest import MARKS, federation, in_threads, size_of, timing, trials, upload_all, wait_round
from .invariants import assert_exactly_once, read_events

pytestmark = MARKS

THREADS = 8


def _sweep_together(dep, n: int) -> list[SweepReport]:
    """``sweep`` from ``n`` threads released at once, each with its own connections."""
    settings = dep.settings()
    dispatch = get_dispatcher(settings)
    runtimes = [Runtime.from_settings(settings) for _ in range(n)]
    barrier = threading.Barrier(n)
    reports: list[SweepReport] = []

    def go(rt):
        barrier.wait()
        reports.append(sweep(rt, dispatch))

    in_threads(go, [(rt,) for rt in runtimes])
    return reports


@trials(2)
def test_two_beats_and_concurrent_sweeps_close_each_round_once(deployment, delta_file, trial):
    fed = f"beat-{trial}"
    deployment.env.update(timing(8, 10, 30, 40), CHORUS_SWEEP_INTERVAL="0.3")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=100, round_timeout=1, min_quorum=2)
    worker = deployment.start_worker(wait=False)
    beats = [deployment.start_beat(wait=False) for _ in range(2)]
    deployment.wait_ready(worker)
    accepted = []

    def fill(r: int):
        accepted.extend(upload_all(sdk, fed, (2 * r - 2, 2 * r - 1), delta_file))

    fill(1)
    assert wait_round(deployment, fed, 1) == "complete"
    assert all(b.poll() is None and "beat: sweeping every" in deployment.log(b) for b in beats)

    deployment.kill(beats[0])  # SIGKILL mid-loop: nothing was held, nothing must be released
    fill(2)
    assert wait_round(deployment, fed, 2) == "complete"

    fill(3)
    deadline = sdk.state.round(fed, 3).deadline
    time.sleep(max(0.0, deadline - time.time()))  # due now: the beat's sweep and the threads race
    reports = _sweep_together(deployment, THREADS)
    assert wait_round(deployment, fed, 3) == "complete"
    fired = [entry for rep in reports for entry in rep.fired]
    assert fired in ([], [(fed, 3)]), f"threads fired {fired}"
    assert not [rep.errors for rep in reports if rep.errors]

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"], 2: ["c2", "c3"], 3: ["c4", "c5"]}
    closes = [e for e in report.events if e["type"] == EventType.ROUND_AGGREGATING]
    assert [e["reason"] for e in closes] == ["deadline"] * 3


def test_beat_survives_redis_restarts(deployment, redis_server, delta_file):
    fed = "beat-restarts"
    deployment.env.update(timing(8, 10, 30, 40), CHORUS_SWEEP_INTERVAL="0.3")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=100, round_timeout=2, min_quorum=1)
    worker = deployment.start_worker(wait=False)
    beat = deployment.start_beat()
    deployment.wait_ready(worker)
    for sig_kill in (True, False, True):  # SIGKILL, SIGTERM (a clean shutdown), SIGKILL
        seen = deployment.log(beat).count("unavailable")
        redis_server.stop(sig_kill=sig_kill)
        wait_for(lambda seen=seen: deployment.log(beat).count("unavailable") > seen, 30, "the beat to notice")
        redis_server.start()
        assert beat.poll() is None, f"beat exited after a Redis restart:\n{deployment.log(beat)}"
    restarted = time.time()

    accepted = upload_all(sdk, fed, (0,), delta_file)
    assert wait_round(deployment, fed, 1) == "complete"
    closes = [e for e in read_events(sdk.redis, fed) if e["type"] == EventType.ROUND_AGGREGATING]
    assert [e["reason"] for e in closes] == ["deadline"] and closes[0]["ts"] > restarted
    assert beat.poll() is None and worker.poll() is None
    report = assert_exactly_once(deployment, fed, sizes={"c0": size_of(0)}, accepted=accepted)
    assert report.complete == {1: ["c0"]}
    deployment.kill(beat, signal.SIGTERM)  # a signal stops it cleanly
    assert beat.wait(timeout=30) == 0
