"""Fault 3: Redis goes away under a running round, and comes back (AOF on, fsync always).

Within one round: a restart after the first acceptance, ``CLIENT KILL TYPE normal`` (every
worker, client and SDK connection) after the second, and another restart while the
aggregation is paused mid-way. The same worker must keep consuming throughout (kombu had a
bug where workers stopped consuming after a Redis restart): it accepts the rest of round 1
and all of round 2 with no new worker started.
"""

from __future__ import annotations

from .conftest import MARKS, federation, size_of, timing, trials, upload, upload_all, wait_hook, wait_round
from .faulty_app import release
from .invariants import assert_exactly_once

pytestmark = MARKS


@trials(2)
def test_redis_restart_and_client_kill_mid_round(deployment, redis_server, delta_file, trial):
    fed = f"redis-{trial}"
    hard_kill = trial % 2 == 0  # SIGKILL: only the AOF (appendfsync always) keeps the state
    deployment.env.update(timing(8, 10, 30, 40), CHORUS_FAULT_PAUSE="shard=30")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    worker = deployment.start_worker(faulty=True)

    accepted = [upload(sdk, fed, "c0", delta_file(0), size_of(0))]
    redis_server.restart(sig_kill=hard_kill)
    accepted.append(upload(sdk, fed, "c1", delta_file(1), size_of(1)))
    killed = redis_server.client().client_kill_filter(_type="normal")
    assert killed >= 2, "the worker's and the SDK's connections should have been killed"
    accepted.append(upload(sdk, fed, "c2", delta_file(2), size_of(2)))  # fires the quorum

    wait_hook(deployment, "shard", fed, "1:0")  # the shard is paused after writing its objects
    redis_server.restart(sig_kill=hard_kill)
    release(sdk.redis, "shard", fed, "1:0")
    assert wait_round(deployment, fed, 1) == "complete"

    accepted += upload_all(sdk, fed, range(3, 6), delta_file)
    assert wait_round(deployment, fed, 2) == "complete"
    assert worker.poll() is None and len(deployment.workers) == 1

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
