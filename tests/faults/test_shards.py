"""Fault 10: a round split into shards loses a worker mid-shard, and a commit dies mid-way.

* Four shards (``CHORUS_SHARD_BYTES=1``) on two workers: the last shard is paused with its
  objects written and ``shard_done`` not recorded while the other three are done, and its
  worker is SIGKILLed. Once the lease runs out, the sweep finds three shards done and re-sends
  only the lost one under the same epoch (no attempt spent), which the surviving worker runs.
* The commit is SIGKILLed with the manifest written and the round not finalized. The commit
  comes back by redelivery or by the sweep's re-send (both the same epoch); the second commit
  adopts the manifest already there.

Each round completes exactly once, and what users pull is byte-identical to an unsharded,
undisturbed reference run.
"""

from __future__ import annotations

import psutil
import pytest

from chorus_mq.layout import manifest_key
from chorus_mq.names import EventType, RoundStatus

from ..topology import wait_for
from .conftest import (
    MARKS,
    WIDE,
    federation,
    size_of,
    timing,
    trials,
    upload_all,
    wait_hook,
    wait_round,
    worker_of,
)
from .faulty_app import arrivals
from .invariants import assert_exactly_once

pytestmark = MARKS


@trials(2)
def test_sigkill_one_worker_mid_shard_of_a_sharded_round(deployment, wide_delta_file, trial):
    fed = f"shards-{trial}"
    deployment.env.update(
        timing(8, 10, 120, 5),
        CHORUS_SHARD_BYTES="1",
        CHORUS_SWEEP_INTERVAL="0.5",
        CHORUS_FAULT_PAUSE="shard=120",
        CHORUS_FAULT_SHARDS="3",
    )
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3, modules=WIDE)
    workers = [deployment.start_worker(faulty=True, wait=False) for _ in range(2)]
    deployment.wait_ready(*workers)
    deployment.start_beat()
    accepted = upload_all(sdk, fed, range(3), wide_delta_file)

    pid = wait_hook(deployment, "shard", fed, "1:3")
    wait_for(lambda: sorted(sdk.state.shards(fed, 1)) == [0, 1, 2], 60, "the other three shards to be done")
    doomed = worker_of(deployment, pid)
    (survivor,) = [w for w in workers if w is not doomed]
    deployment.kill(doomed)  # some shards done, one running: its results written, not recorded
    assert sdk.state.round(fed, 1).state == RoundStatus.AGGREGATING
    assert not sdk.store.exists(manifest_key(fed, 1))

    assert wait_round(deployment, fed, 1) == "complete"
    rerun = wait_hook(deployment, "shard", fed, "1:3", run=2)
    assert rerun in {c.pid for c in psutil.Process(survivor.pid).children()}
    assert [len(arrivals(sdk.redis, "shard", fed, f"1:{k}")) for k in range(4)] == [1, 1, 1, 2], (
        "only the lost shard should run again"
    )
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]} and report.reclaims == 0  # a re-send, not a reclaim
    assert sdk.state.round(fed, 1).resends >= 1
    assert [s.items for s in report.manifests[1].shards] == [1, 1, 1, 1]


@pytest.mark.parametrize("recovery", ["redelivery", "sweep"])
def test_sigkill_mid_commit(deployment, delta_file, recovery):
    fed = f"commit-{recovery}"
    if recovery == "redelivery":  # no beat: the commit message comes back after the visibility timeout
        env = {**timing(3, 4, 5, 120), "CHORUS_FAULT_RESTORE_INTERVAL": "0.5"}
    else:  # the lease runs out long before the message would come back
        env = {**timing(3, 4, 120, 5), "CHORUS_SWEEP_INTERVAL": "0.5"}
    deployment.env.update(env, CHORUS_FAULT_PAUSE="commit=60")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    doomed = deployment.start_worker(faulty=True)
    accepted = upload_all(sdk, fed, range(3), delta_file)

    wait_hook(deployment, "commit", fed, 1)
    deployment.kill(doomed)  # the manifest is written; the round is not finalized
    written = sdk.store.get_bytes(manifest_key(fed, 1))
    assert sdk.state.round(fed, 1).state == RoundStatus.AGGREGATING

    deployment.start_worker(faulty=True)
    if recovery == "sweep":
        deployment.start_beat()
    assert wait_round(deployment, fed, 1) == "complete"
    wait_hook(deployment, "commit", fed, 1, run=2)
    assert sdk.store.get_bytes(manifest_key(fed, 1)) == written, "the second commit must adopt the manifest"
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]}
    done = next(e for e in report.events if e["type"] == EventType.ROUND_COMPLETE)
    assert (report.reclaims, done["epoch"]) == (0, 1)  # the same epoch either way: no attempt spent
    assert (sdk.state.round(fed, 1).resends >= 1) == (recovery == "sweep")
