"""Fault 13: a compaction SIGKILLed midway (snapshot object written, not recorded).

Compaction is off every round's critical path: with it dead, every round stays pullable (a
late joiner's pull, from the increments alone, equals a continuing client's), the next round
completes, and asking again (``chorus-mq compact``) produces the snapshot, which a late
joiner then starts from and still gets the very same round.
"""

from __future__ import annotations

from pathlib import Path

from chorus_mq.names import EventType

from ..topology import wait_for
from .conftest import MARKS, federation, size_of, timing, upload_all, wait_hook, wait_round
from .invariants import RESULT, assert_exactly_once, assert_same_correction, read_events

pytestmark = MARKS


def assert_same_round(late: Path, continuing: Path) -> None:
    """A late joiner holds the continuing client's round: the same result files, the same correction."""
    for name in RESULT:
        assert (late / name).read_bytes() == (continuing / name).read_bytes(), f"a late joiner's {name} differs"
    assert_same_correction(late, continuing)


def test_compaction_killed_midway_leaves_every_round_pullable(deployment, delta_file, tmp_path):
    fed = "compact"
    # short task limits: the dead compaction's lock expires after CHORUS_TASK_TIME_LIMIT
    deployment.env.update(timing(4, 5, 30, 30), CHORUS_FAULT_PAUSE="compact=120", CHORUS_FAULT_ROUNDS="2")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3, checkpoint_every=0)  # compaction only on demand
    doomed = deployment.start_worker(faulty=True)
    accepted = []
    continuing = tmp_path / "continuing"
    for r in (1, 2):
        accepted += upload_all(sdk, fed, range(3 * r - 3, 3 * r), delta_file)
        assert wait_round(deployment, fed, r) == "complete"
        sdk.pull(fed, continuing, r)

    asked = deployment.cli("compact", "--federation", fed, "--round", "2")
    assert "requested" in asked.stdout
    wait_hook(deployment, "compact", fed, 2)
    deployment.kill(doomed)
    orphans = sdk.store.list(f"{fed}/snapshots/")
    assert len(orphans) == 1 and sdk.state.snapshots(fed) == {}, "the snapshot is written but not recorded"

    late = tmp_path / "late-2"
    sdk.pull(fed, late, 2)  # from the increments alone: the orphan snapshot is never read
    assert_same_round(late, continuing)

    deployment.start_worker()
    accepted += upload_all(sdk, fed, range(6, 9), delta_file)  # the rounds go on without the snapshot
    assert wait_round(deployment, fed, 3) == "complete"
    sdk.pull(fed, continuing, 3)

    lock = sdk.state.keys(fed).compaction
    wait_for(lambda: not sdk.redis.exists(lock), 30, "the dead compaction's lock to expire")
    deployment.cli("compact", "--federation", fed, "--round", "2")  # the rerun
    snapshot = wait_for(lambda: sdk.state.snapshots(fed).get(2), 60, "the rerun to record the snapshot")
    assert snapshot.base is None and snapshot.rounds == 2
    assert sdk.store.list(f"{fed}/snapshots/") == orphans, "the rerun wrote the same snapshot object"
    assert [e["round"] for e in read_events(sdk.redis, fed) if e["type"] == EventType.SNAPSHOT_READY] == [2]
    late = tmp_path / "late-3"
    sdk.pull(fed, late, 3)  # the snapshot of rounds 1-2 and round 3's increment
    assert_same_round(late, continuing)

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(9)}, accepted=accepted)
    assert sorted(report.complete) == [1, 2, 3]
