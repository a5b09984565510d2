"""Identity and hostile messages through the real ingest path: signatures, replays, revocation, posing."""

from __future__ import annotations

import hashlib
import time

import pytest

from chorus_mq.errors import Rejected
from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage

from ..deltas import random_factors, write_adapter


def _object(sdk, tmp_path, client, seed=0):
    path = write_adapter(tmp_path / f"{client}-{seed}.safetensors", random_factors(seed))
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    key = delta_key("fed", client, sha)
    sdk.store.put_bytes(key, data, write_once=False)
    return IngestMessage(federation="fed", client_id=client, object_key=key, sha256=sha, size=len(data))


@pytest.fixture
def fed(make_sdk):
    admin = make_sdk(allow_unsigned=False)
    admin.create_federation("fed", base_model="m", quorum=5)
    secrets = {name: admin.clients("fed").add(name) for name in ("alice", "bob")}
    return make_sdk, secrets


def test_signed_upload_is_accepted(fed, tmp_path):
    make_sdk, secrets = fed
    sdk = make_sdk(secret=secrets["alice"], allow_unsigned=False)
    assert sdk.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "alice").status == "accepted"


@pytest.mark.parametrize("case", ["unsigned", "wrong-secret", "unregistered", "posing-as-bob", "altered",
                                  "stale", "others-object-key", "revoked"])
def test_forged_and_unauthorised_messages_are_rejected(fed, tmp_path, case):
    make_sdk, secrets = fed
    sdk = make_sdk(allow_unsigned=False)
    msg = _object(sdk, tmp_path, "alice")
    needle = "signature"
    if case == "unsigned":
        pass
    elif case == "wrong-secret":
        msg = msg.signed(secrets["bob"])
    elif case == "unregistered":
        msg = _object(sdk, tmp_path, "mallory").signed("guess")
        needle = "not registered"
    elif case == "posing-as-bob":  # alice signs a message claiming to be bob
        msg = _object(sdk, tmp_path, "bob").signed(secrets["alice"])
    elif case == "altered":
        msg = msg.signed(secrets["alice"]).model_copy(update={"dataset_size": 10_000.0})
    elif case == "stale":
        msg = msg.model_copy(update={"ts": time.time() - 3600}).signed(secrets["alice"])
        needle = "timestamp"
    elif case == "others-object-key":
        bobs = _object(sdk, tmp_path, "bob", seed=3)
        msg = msg.model_copy(update={"object_key": bobs.object_key, "sha256": bobs.sha256}).signed(secrets["alice"])
        needle = "not this client's"
    elif case == "revoked":
        sdk.clients("fed").revoke("alice")
        msg = msg.signed(secrets["alice"])
        needle = "revoked"
    with pytest.raises(Rejected, match=needle):
        sdk.submit(msg, timeout=10)
    assert sdk.status("fed")["deltas"] == 0


def test_replayed_message_changes_nothing(fed, tmp_path):
    make_sdk, secrets = fed
    sdk = make_sdk(allow_unsigned=False)
    msg = _object(sdk, tmp_path, "alice").signed(secrets["alice"])
    assert sdk.submit(msg, timeout=10).status == "accepted"
    assert sdk.submit(msg, timeout=10).status == "duplicate"  # a redelivery or a replay: idempotent
    other = _object(sdk, tmp_path, "alice", seed=7)
    reused = other.model_copy(update={"nonce": msg.nonce}).signed(secrets["alice"])
    with pytest.raises(Rejected, match="replay"):
        sdk.submit(reused, timeout=10)
    assert sdk.status("fed")["deltas"] == 1


def test_path_tricks_in_names_are_refused(sdk, tmp_path):
    from chorus_mq.errors import ConfigError
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65, "a\x00b"):
        with pytest.raises(ConfigError):
            sdk.create_federation(bad, base_model="m", quorum=1)
    sdk.create_federation("fed", base_model="m", quorum=1)
    with pytest.raises(ConfigError):
        sdk.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "../bob")


def test_messages_for_unknown_or_invalid_federations_leave_no_trace(sdk, tmp_path):
    from chorus_mq.workers.tasks import ingest_task
    before = set(sdk.redis.keys("*"))
    for fed in ("ghost", "../etc"):
        verdict = ingest_task.apply(args=[{"federation": fed, "client_id": "c", "object_key": "x", "size": 1,
                                           "sha256": "a" * 64}]).get()
        assert not verdict["accepted"] and verdict["status"] in ("unknown_federation", "config")
    assert set(sdk.redis.keys("*")) == before
