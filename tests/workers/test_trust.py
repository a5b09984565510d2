"""Identity and hostile records through the real ingest path: signatures, replays, revocation, posing.

A record whose sender cannot be established is logged and counted, never published: it writes
no event into the federation's stream. An authenticated client's bad record is rejected with a
reason in its federation's stream.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from chorus_mq.errors import Rejected
from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.state import EventLog
from chorus_mq.state.inbox import Inbox
from chorus_mq.workers.inprocess import drain_inbox

from ..deltas import make_federation, random_factors, write_adapter


def _object(sdk, tmp_path, client, seed=0):
    path = write_adapter(tmp_path / f"{client}-{seed}.safetensors", random_factors(seed))
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    sdk.store.put_bytes(delta_key("fed", client, sha), data, write_once=False)
    return IngestMessage(federation="fed", client_id=client, sha256=sha, size=len(data))


@pytest.fixture
def fed(make_sdk):
    admin = make_sdk(allow_unsigned=False)
    make_federation(admin, "fed", quorum=5)
    secrets = {name: admin.add_client("fed", name).secret for name in ("alice", "bob")}
    return make_sdk, secrets


def test_signed_upload_is_accepted(fed, tmp_path):
    make_sdk, secrets = fed
    sdk = make_sdk(secret=secrets["alice"], allow_unsigned=False)
    assert sdk.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "alice").status == "accepted"


@pytest.mark.parametrize(
    "case", ["unsigned", "wrong-secret", "unregistered", "posing-as-bob", "altered", "revoked", "in-bobs-inbox"]
)
def test_unauthenticated_records_are_counted_never_published(fed, tmp_path, case):
    make_sdk, secrets = fed
    sdk = make_sdk(allow_unsigned=False)
    msg = _object(sdk, tmp_path, "alice")
    inbox = "alice"
    if case == "unsigned":
        inbox = None
    elif case == "wrong-secret":
        msg = msg.signed(secrets["bob"])
    elif case == "unregistered":
        msg = _object(sdk, tmp_path, "mallory").signed("guess")
        inbox = None
    elif case == "posing-as-bob":  # alice signs a record claiming to be bob
        msg = _object(sdk, tmp_path, "bob").signed(secrets["alice"])
        inbox = "bob"
    elif case == "altered":
        msg = msg.signed(secrets["alice"]).model_copy(update={"dataset_size": 10_000.0})
    elif case == "revoked":
        sdk.revoke_client("fed", "alice")
        msg = msg.signed(secrets["alice"])
    elif case == "in-bobs-inbox":  # a validly signed record of alice's, found in bob's inbox
        msg = msg.signed(secrets["alice"])
        inbox = "bob"
    log = EventLog(sdk.redis, "fed")
    before = log.last_id()
    Inbox(sdk.redis, "fed", inbox).append(msg.model_dump_json())
    drain_inbox(sdk.settings, sdk.redis, sdk.store, "fed")  # the pump and the ingest task run now
    assert [e.type for e in log.read(before)] == []  # nothing published
    assert sum(sdk.status("fed").rejected.values()) == 1
    assert sdk.status("fed").deltas == 0


@pytest.mark.parametrize("case", ["stale", "missing-object", "too-big-a-claim"])
def test_an_authenticated_clients_bad_record_is_rejected_with_a_reason(fed, tmp_path, case):
    make_sdk, secrets = fed
    sdk = make_sdk(allow_unsigned=False)
    msg = _object(sdk, tmp_path, "alice")
    if case == "stale":
        msg, needle = msg.model_copy(update={"ts": time.time() - 3600}), "timestamp"
    elif case == "missing-object":  # the sha of an object alice never uploaded
        msg, needle = msg.model_copy(update={"sha256": "ab" * 32}), "does not exist"
    else:
        msg, needle = msg.model_copy(update={"dataset_size": 1e12}), "dataset size"
    with pytest.raises(Rejected, match=needle):
        sdk.submit(msg.signed(secrets["alice"]), timeout=10)
    assert sdk.status("fed").deltas == 0


def test_replayed_record_changes_nothing(fed, tmp_path):
    make_sdk, secrets = fed
    sdk = make_sdk(allow_unsigned=False)
    msg = _object(sdk, tmp_path, "alice").signed(secrets["alice"])
    assert sdk.submit(msg, timeout=10).status == "accepted"
    assert sdk.submit(msg, timeout=10).status == "duplicate"  # a redelivery or a replay: idempotent
    other = _object(sdk, tmp_path, "alice", seed=7)
    reused = other.model_copy(update={"nonce": msg.nonce}).signed(secrets["alice"])
    with pytest.raises(Rejected, match="replay"):
        sdk.submit(reused, timeout=10)
    assert sdk.status("fed").deltas == 1


def test_path_tricks_in_names_are_refused(sdk, tmp_path):
    from chorus_mq.errors import ConfigError

    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65, "a\x00b", "alice\n"):
        with pytest.raises(ConfigError):
            make_federation(sdk, bad, quorum=1)
    make_federation(sdk, "fed", quorum=1)
    with pytest.raises(ConfigError):
        sdk.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "../bob")
    with pytest.raises(ConfigError):
        sdk.add_client("fed", "alice\n")


def test_records_for_unknown_or_invalid_federations_leave_no_trace(sdk, tmp_path):
    from chorus_mq.workers import runtime
    from chorus_mq.workers.ingest import ingest

    before = set(sdk.redis.keys("*"))
    for fed in ("ghost", "../etc"):
        raw = IngestMessage(federation=fed, client_id="c", sha256="a" * 64, size=1).model_dump_json()
        verdict = ingest(runtime.current(), fed, None, "1-0", raw, dispatch=None)
        assert not verdict.accepted
    assert set(sdk.redis.keys("*")) == before
