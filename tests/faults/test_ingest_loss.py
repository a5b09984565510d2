"""Fault 12: an ingest worker dies with clients' records in flight.

* Its inbox pump read three records (they are pending in the consumer group under its name)
  and neither enqueued their ingest tasks nor acknowledged them; the worker is SIGKILLed.
  Another ingest worker's pump claims them once they have been idle ``CHORUS_INBOX_CLAIM_IDLE_S``
  and ingests them: nothing lost, nothing doubled, the inbox left empty.
* An ingest task copied and indexed its delta and had not registered it when its worker was
  SIGKILLed (the pump had acknowledged the record: only Celery's redelivery brings it back).
  The redelivered task finds the copy and the index written, and registers the delta once.
"""

from __future__ import annotations

from chorus_mq.names import INBOX_GROUP, EventType, WorkerRole
from chorus_mq.state import Inbox

from ..topology import wait_for
from .conftest import MARKS, federation, size_of, timing, trials, upload, wait_hook, wait_round
from .faulty_app import arrivals
from .invariants import Accepted, assert_exactly_once, read_events

pytestmark = MARKS


def _verdicts(sdk, fed: str, uploads) -> list[Accepted] | None:
    """The acceptance of every upload (``UploadResult`` queued without waiting), once each has one."""
    found = {e["upload_id"]: e for e in read_events(sdk.redis, fed) if e["type"] == EventType.DELTA_ACCEPTED}
    if not all(u.upload_id in found for u in uploads):
        return None
    return [Accepted(u.client_id, found[u.upload_id]["round"], u.sha256) for u in uploads]


@trials(2)
def test_pump_dies_with_records_pending(deployment, delta_file, trial):
    fed = f"pump-{trial}"
    deployment.env.update(CHORUS_FAULT_PAUSE="pump=120", CHORUS_INBOX_CLAIM_IDLE_S="2")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    # the records are in the inbox before any pump runs: the first read takes all three
    queued = [sdk.upload(fed, delta_file(i), f"c{i}", dataset_size=size_of(i), wait=False) for i in range(3)]
    assert {u.status for u in queued} == {"queued"}
    aggregator = deployment.start_worker(role=WorkerRole.AGGREGATE, wait=False)
    doomed = deployment.start_worker(role=WorkerRole.INGEST, faulty=True)
    inbox = Inbox(sdk.redis, fed)
    wait_for(lambda: any(arrivals(sdk.redis, "pump", fed, f"c{i}") for i in range(3)), 60, "the pump to read")
    pending = sdk.redis.xpending_range(inbox.key, INBOX_GROUP, "-", "+", 10)
    assert len(pending) == 3 and inbox.length() == 3, pending
    assert all(p["consumer"].startswith(f"{doomed.hostname}@") for p in pending), pending
    assert not [e for e in read_events(sdk.redis, fed) if e["type"] == EventType.DELTA_ACCEPTED]
    deployment.kill(doomed)

    deployment.wait_ready(aggregator)
    rescuer = deployment.start_worker(role=WorkerRole.INGEST)
    accepted = wait_for(lambda: _verdicts(sdk, fed, queued), 60, "the rescuing pump to ingest the records")
    assert wait_round(deployment, fed, 1) == "complete"
    assert (inbox.length(), inbox.pending()) == (0, 0), "the claimed records should be acknowledged and deleted"
    assert f"inbox pump {rescuer.hostname}" in deployment.log(rescuer)
    events = read_events(sdk.redis, fed)
    assert not [e for e in events if e["type"] == EventType.DELTA_ACCEPTED and e.get("duplicate")], (
        "a claimed record was ingested twice"
    )
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]}


@trials(2)
def test_ingest_killed_before_registering(deployment, delta_file, trial):
    fed = f"ingest-{trial}"
    deployment.env.update(
        timing(3, 4, 5, 120),
        CHORUS_FAULT_RESTORE_INTERVAL="0.5",
        CHORUS_FAULT_PAUSE="ingest=60",
        CHORUS_FAULT_CLIENTS="c0",
    )
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=2)
    aggregator = deployment.start_worker(role=WorkerRole.AGGREGATE, wait=False)
    doomed = deployment.start_worker(role=WorkerRole.INGEST, faulty=True)
    queued = sdk.upload(fed, delta_file(0), "c0", dataset_size=size_of(0), wait=False)
    wait_hook(deployment, "ingest", fed, "c0")  # the accepted copy and the index are written
    assert sdk.state.registered_sha(fed, 1, "c0") is None
    deployment.kill(doomed)

    deployment.wait_ready(aggregator)
    deployment.start_worker(role=WorkerRole.INGEST, faulty=True)
    accepted = wait_for(lambda: _verdicts(sdk, fed, [queued]), 60, "the redelivered ingest to register the delta")
    assert len(arrivals(sdk.redis, "ingest", fed, "c0")) == 2, "the ingest should have run again"
    accepted.append(upload(sdk, fed, "c1", delta_file(1), size_of(1)))
    assert wait_round(deployment, fed, 1) == "complete"
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(2)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1"]}
