"""What a client stores and reads in S3, over the e2e stack (IAM-enforcing S3, ACL Redis, worker subprocesses).

* Finding 12: the workers delete a client's upload once its verdict is recorded (accepted: after their own
  copy exists; rejected: outright), so a client's own prefix holds only uploads in flight; a forged record
  deletes nothing; the SDK matches its verdict on client id as well as upload id.
* Finding 14: a client's own least-privilege keys (the policy ``client s3-policy`` prints) pull a round,
  manifests, shard objects and a snapshot.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from chorus_mq.errors import Rejected, Timeout
from chorus_mq.layout import accepted_key, client_prefix, delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.names import ADAPTER_WEIGHTS, CUMULATIVE_FILE, EventType
from chorus_mq.state.inbox import Inbox

from ..deltas import random_factors, write_adapter
from .stack import events, put_raw, submit_raw, wait_for
from .test_trust_e2e import complete, delta, make_fed, upload

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def _own_objects(stack, creds) -> list[str]:
    """What the client's writable prefix holds (listed with the admin's keys: clients cannot list).

    The whole bucket is listed and filtered: moto misverifies the signature of a list whose Prefix holds a "/".
    """
    own = f"{stack.prefix}/{client_prefix(creds.federation, creds.client)}"
    pages = stack.s3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
    return sorted(k[len(stack.prefix) + 1 :] for k in keys if k.startswith(own))


def test_uploads_are_deleted_with_their_verdict_and_a_forged_record_deletes_nothing(stack, tmp_path):
    fed = make_fed(stack, "s12-cleanup", quorum=3)
    alice = stack.add_client(fed, "alice")
    admin, sdk = stack.admin_store(), stack.client(alice)

    accepted = upload(stack, alice, tmp_path, 1)
    assert accepted.status == "accepted"
    # the verdict is published inside the registration; the deletion follows it in the same task
    wait_for(lambda: not admin.exists(delta_key(fed, "alice", accepted.sha256)), 30, "the accepted upload deleted")
    assert admin.exists(accepted_key(fed, "alice", accepted.sha256))  # the workers' own copy stays

    # a record whose signature does not verify (someone holding alice's Redis URL, not her secret) names
    # an upload alice has not sent yet: it is dropped, and her object stays
    pending = delta(tmp_path, "pending", 7)
    pending_sha = put_raw(sdk, fed, "alice", pending)
    forged = IngestMessage(federation=fed, client_id="alice", sha256=pending_sha, size=len(pending), dataset_size=1.0)
    sdk.submit(forged, wait=False, secret="not-alices-secret-" + "x" * 20)

    # alice's inbox is read in order: once her next record is judged, the forged one was too
    junk = b"not a safetensors file" * 100
    with pytest.raises(Rejected):
        submit_raw(sdk, fed, "alice", junk, dataset_size=10.0)
    junk_sha = hashlib.sha256(junk).hexdigest()
    wait_for(lambda: not admin.exists(delta_key(fed, "alice", junk_sha)), 30, "the rejected upload deleted")
    assert not admin.exists(accepted_key(fed, "alice", junk_sha))
    assert admin.get_bytes(delta_key(fed, "alice", pending_sha)) == pending
    assert _own_objects(stack, alice) == [delta_key(fed, "alice", pending_sha)]  # only what is in flight
    assert not any(e.get("sha256") == pending_sha for e in events(stack.operator(), fed))


def test_a_redelivered_record_after_its_upload_was_deleted_is_a_duplicate(stack, tmp_path):
    fed = make_fed(stack, "s12-redeliver", quorum=3)
    alice = stack.add_client(fed, "alice")
    sdk = stack.client(alice)
    data = delta(tmp_path, "d", 3)
    sha = put_raw(sdk, fed, "alice", data)
    msg = IngestMessage(federation=fed, round=1, client_id="alice", sha256=sha, size=len(data), dataset_size=5.0)
    assert sdk.submit(msg, timeout=60).status == "accepted"
    wait_for(lambda: not stack.admin_store().exists(delta_key(fed, "alice", sha)), 30, "the upload deleted")
    # the very same signed record again, as a broker redelivery would bring it: read from the workers' copy
    again = sdk.submit(msg, timeout=60)
    assert (again.status, again.round) == ("duplicate", 1)
    assert stack.operator().status(fed).deltas == 1


def test_a_verdict_for_another_clients_record_with_the_same_upload_id_is_not_taken(stack, tmp_path):
    fed = make_fed(stack, "s12-match", quorum=3)
    alice, mallory = stack.add_client(fed, "alice"), stack.add_client(fed, "mallory")
    upload_id = "u-" + "a" * 30
    # alice's record never gets a verdict (its signature does not verify: dropped, unpublished)
    data = delta(tmp_path, "a", 1)
    sha = put_raw(stack.client(alice), fed, "alice", data)
    mine = IngestMessage(
        federation=fed, client_id="alice", sha256=sha, size=len(data), dataset_size=5.0, upload_id=upload_id
    )
    outcome: dict[str, object] = {}

    def wait_alice() -> None:
        try:
            outcome["result"] = stack.client(alice).submit(mine, timeout=12, secret="wrong-secret-" + "y" * 24)
        except Exception as exc:
            outcome["error"] = exc

    inbox = Inbox(stack.admin_redis(), fed, "alice").key
    before = stack.admin_redis().xinfo_stream(inbox)["last-generated-id"] if stack.admin_redis().exists(inbox) else ""
    waiter = threading.Thread(target=wait_alice)
    waiter.start()
    wait_for(lambda: stack.admin_redis().xinfo_stream(inbox)["last-generated-id"] != before, 30, "alice's record")
    # mallory reuses alice's upload id on its own, valid record: its acceptance is in the same event stream
    theirs = delta(tmp_path, "m", 2)
    msha = put_raw(stack.client(mallory), fed, "mallory", theirs)
    forged_id = IngestMessage(
        federation=fed, client_id="mallory", sha256=msha, size=len(theirs), dataset_size=5.0, upload_id=upload_id
    )
    assert stack.client(mallory).submit(forged_id, timeout=60).status == "accepted"
    started = time.monotonic()
    waiter.join(60)
    assert not waiter.is_alive()
    assert isinstance(outcome.get("error"), Timeout), outcome  # not mallory's "accepted"
    accepted = [e for e in events(stack.operator(), fed) if e["type"] == EventType.DELTA_ACCEPTED]
    assert [(e["client"], e["upload_id"]) for e in accepted] == [("mallory", upload_id)]
    assert time.monotonic() - started < 30


def test_a_client_pulls_rounds_and_snapshots_with_its_own_keys(stack, tmp_path):
    fed = make_fed(stack, "s14-pull", quorum=2)
    alice, bob = stack.add_client(fed, "alice"), stack.add_client(fed, "bob")
    for creds, seed in ((alice, 1), (bob, 2)):
        path = write_adapter(tmp_path / f"{creds.client}.safetensors", random_factors(seed))
        stack.client(creds).upload(fed, path, creds.client, dataset_size=10.0, timeout=90)
    complete(stack, fed, 1)
    stack.start_worker("compact")
    operator = stack.operator()
    operator.compact(fed, 1)
    wait_for(lambda: operator.state.snapshots(fed).get(1), 120, "round 1's snapshot")
    snapshot = operator.state.snapshots(fed)[1]

    # a fresh directory: the manifest, the snapshot (snapshots/) and the shard objects (rounds/), all with
    # alice's least-privilege keys, which carry exactly the policy `client s3-policy` prints
    pulled = stack.client(alice).pull(fed, tmp_path / "alice")
    assert sorted(c.client_id for c in pulled.clients) == ["alice", "bob"]
    cumulative = (tmp_path / "alice" / CUMULATIVE_FILE).read_bytes()
    assert hashlib.sha256(cumulative).hexdigest() == snapshot.sha256
    reference = operator.pull(fed, tmp_path / "operator")  # the admin's keys read the same bytes
    assert reference.to_json() == pulled.to_json()
    assert (tmp_path / "alice" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "operator" / ADAPTER_WEIGHTS).read_bytes()
    # and the CLI, as the client runs it with only its URL and keys in the environment
    cli = stack.cli("pull", "-f", fed, "-o", str(tmp_path / "alice-cli"), as_=alice)
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "alice-cli" / ADAPTER_WEIGHTS).read_bytes() == (
        tmp_path / "alice" / ADAPTER_WEIGHTS
    ).read_bytes()
