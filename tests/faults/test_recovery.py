"""Fault 11: recovery within a minute with every timing at its default (issue 9's finding).

Lease 30 s, sweep every 5 s, visibility timeout 3600 s, and ``chorus-mq beat`` running: the
only aggregate worker is SIGKILLed while the round aggregates (a shard paused with its
objects written) and a new one is started. The round must complete within about a minute of
the kill (the old defaults left it waiting ~32 minutes), exactly once.
"""

from __future__ import annotations

import time

from chorus_mq.names import RoundStatus, WorkerRole
from chorus_mq.settings import Settings

from .conftest import MARKS, federation, size_of, upload_all, wait_hook, wait_round
from .invariants import assert_exactly_once

pytestmark = MARKS

#: the liveness bound: a lease (30 s) plus a sweep period (5 s) plus a worker's start and the round's work
BOUND_S = 75


def test_recovery_within_a_minute_with_default_settings(deployment, delta_file, capsys):
    fed = "defaults"
    assert not [
        k
        for k in deployment.env
        if k.startswith("CHORUS_")
        and any(word in k for word in ("LEASE", "SWEEP", "VISIBILITY", "TIME_LIMIT", "CLAIM"))
    ], "timings must be defaults"
    defaults = Settings(redis_url=deployment.redis_url)
    assert (defaults.aggregation_lease, defaults.sweep_interval, defaults.visibility_timeout) == (30, 5.0, 3600)
    deployment.env.update(CHORUS_FAULT_PAUSE="shard=600")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    ingest = deployment.start_worker(role=WorkerRole.INGEST, wait=False)
    doomed = deployment.start_worker(role=WorkerRole.AGGREGATE, faulty=True, wait=False)
    deployment.wait_ready(ingest, doomed)
    deployment.start_beat()
    accepted = upload_all(sdk, fed, range(3), delta_file)

    wait_hook(deployment, "shard", fed, "1:0")
    killed = time.monotonic()
    deployment.kill(doomed)
    deployment.start_worker(role=WorkerRole.AGGREGATE, faulty=True)
    assert wait_round(deployment, fed, 1, timeout=BOUND_S + 30) == "complete"
    took = time.monotonic() - killed
    with capsys.disabled():
        print(f"\n[recovery, default settings] round complete {took:.1f}s after the only aggregate worker was killed")
    assert took <= BOUND_S, f"the round took {took:.0f}s to recover (bound {BOUND_S}s)"
    assert sdk.state.round(fed, 1).state == RoundStatus.COMPLETE
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    # the lost shard was re-sent under the same epoch: the round kept all of its attempts
    assert report.complete == {1: ["c0", "c1", "c2"]} and report.reclaims == 0
    assert sdk.state.round(fed, 1).resends >= 1
