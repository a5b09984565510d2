"""Least privilege, enforced: client keys from provision_iam_client against a policy-checking S3.

A dedicated moto server checks IAM policies on every S3 request (tests/store/iamserver.py). The
client is tried both through our Store and through plain boto3, as a hostile client would.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest
from botocore.exceptions import ClientError

from chorus_mq.errors import ConfigError, ObjectExists, StoreError
from chorus_mq.settings import Settings
from chorus_mq.store import S3Credentials, open_store
from chorus_mq.store.policy import POLICY_NAME, client_policy, iam_user_name, provision_iam_client, revoke_iam_client

pytestmark = pytest.mark.services

PREFIX = "fed-data"
MANIFEST = "rounds/000001/manifest.json"


@pytest.fixture
def world(auth_s3):
    """A fresh federation with a completed round, a snapshot and another client's delta, all admin-written."""
    fed = f"f{uuid.uuid4().hex[:10]}"
    admin = open_store(
        f"s3://{auth_s3.bucket}/{PREFIX}", Settings(s3_endpoint_url=auth_s3.url), credentials=auth_s3.admin
    )
    admin.put_bytes(f"{fed}/{MANIFEST}", b'{"round": 1}')
    admin.put_bytes(f"{fed}/snapshots/000001/cumulative-0.safetensors", b"snapshot")
    admin.put_bytes(f"{fed}/deltas/bob/bob.safetensors", b"bob's delta")
    admin.put_bytes(f"other-{fed}/rounds/000001/manifest.json", b"another federation")
    return fed, admin


def _client_store(auth_s3, keys: S3Credentials):
    return open_store(f"s3://{auth_s3.bucket}/{PREFIX}", Settings(s3_endpoint_url=auth_s3.url), credentials=keys)


def _denied(call) -> None:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["Error"]["Code"] == "AccessDenied", info.value.response["Error"]


def test_client_keys_through_boto3(auth_s3, world):
    fed, admin = world
    keys = provision_iam_client(auth_s3.client("iam"), auth_s3.bucket, PREFIX, fed, "alice")
    s3 = auth_s3.client("s3", keys)
    b, p = auth_s3.bucket, f"{PREFIX}/{fed}"
    s3.put_object(Bucket=b, Key=f"{p}/deltas/alice/a.safetensors", Body=b"mine")
    assert s3.head_object(Bucket=b, Key=f"{p}/deltas/alice/a.safetensors")["ContentLength"] == 4
    assert s3.get_object(Bucket=b, Key=f"{p}/{MANIFEST}")["Body"].read() == b'{"round": 1}'
    _denied(lambda: s3.put_object(Bucket=b, Key=f"{p}/deltas/bob/evil.safetensors", Body=b"x"))
    _denied(lambda: s3.put_object(Bucket=b, Key=f"{p}/accepted/alice/a.safetensors", Body=b"x"))
    _denied(lambda: s3.put_object(Bucket=b, Key=f"{p}/{MANIFEST}", Body=b"rewritten"))
    _denied(lambda: s3.put_object(Bucket=b, Key=f"{PREFIX}/other-{fed}/deltas/alice/a", Body=b"x"))
    _denied(lambda: s3.delete_object(Bucket=b, Key=f"{p}/deltas/bob/bob.safetensors"))
    _denied(lambda: s3.delete_object(Bucket=b, Key=f"{p}/deltas/alice/a.safetensors"))
    _denied(lambda: s3.get_object(Bucket=b, Key=f"{p}/deltas/bob/bob.safetensors"))
    _denied(lambda: s3.get_object(Bucket=b, Key=f"{PREFIX}/other-{fed}/rounds/000001/manifest.json"))
    # (moto miscomputes the signature of a list whose Prefix holds a "/", so the list is bucket-wide)
    _denied(lambda: s3.list_objects_v2(Bucket=b, Prefix=fed))
    assert admin.get_bytes(f"{fed}/{MANIFEST}") == b'{"round": 1}'
    assert admin.get_bytes(f"{fed}/deltas/bob/bob.safetensors") == b"bob's delta"


def test_client_keys_through_our_store(auth_s3, world, tmp_path):
    fed, admin = world
    keys = provision_iam_client(auth_s3.client("iam"), auth_s3.bucket, PREFIX, fed, "alice")
    store = _client_store(auth_s3, keys)
    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(b"alice's delta" * 1000)
    sha = hashlib.sha256(delta.read_bytes()).hexdigest()
    own = f"{fed}/deltas/alice/{sha}.safetensors"
    assert store.size(own) is None  # a HEAD 404 plus a GET probe: both only need s3:GetObject
    store.put_file(own, delta)
    with pytest.raises(ObjectExists):
        store.put_file(own, delta)  # write-once still answers as such under the client's keys
    store.put_bytes(f"{fed}/deltas/alice/note", b"n")
    assert store.size(own) == delta.stat().st_size
    assert store.download(own, tmp_path / "back", expected_sha256=sha) == sha
    with store.local_copy(own, expected_sha256=sha, max_bytes=None, spool_dir=tmp_path / "spool") as obj:
        assert obj.size == delta.stat().st_size
    assert store.get_bytes(f"{fed}/{MANIFEST}") == b'{"round": 1}'
    assert b"".join(store.stream(f"{fed}/snapshots/000001/cumulative-0.safetensors", 4)) == b"shot"

    # Listing is refused everywhere (a bucket-wide store: moto misverifies lists whose Prefix holds a "/").
    bucket_wide = open_store(f"s3://{auth_s3.bucket}", Settings(s3_endpoint_url=auth_s3.url), credentials=keys)
    refusals = [
        (lambda: store.put_bytes(f"{fed}/deltas/bob/evil", b"x"), "s3:PutObject", f"{fed}/deltas/bob/evil"),
        (lambda: store.put_bytes(f"{fed}/{MANIFEST}", b"x", write_once=False), "s3:PutObject", MANIFEST),
        (lambda: store.delete(f"{fed}/deltas/bob/bob.safetensors"), "s3:DeleteObject", "bob.safetensors"),
        (lambda: store.delete(own), "s3:DeleteObject", own),
        (lambda: store.get_bytes(f"{fed}/deltas/bob/bob.safetensors"), "s3:GetObject", "bob.safetensors"),
        (lambda: bucket_wide.list(fed), "s3:ListBucket", fed),
        (lambda: store.copy(own, f"{fed}/accepted/alice/{sha}"), "s3:PutObject", f"accepted/alice/{sha}"),
    ]
    for call, permission, key in refusals:
        with pytest.raises(StoreError) as info:
            call()
        msg = str(info.value)
        assert permission in msg and key in msg and "AccessDenied" in msg, msg
    assert admin.get_bytes(f"{fed}/{MANIFEST}") == b'{"round": 1}'
    assert admin.get_bytes(f"{fed}/deltas/bob/bob.safetensors") == b"bob's delta"
    assert admin.exists(own) and not admin.exists(f"{fed}/deltas/bob/evil")
    assert not admin.exists(f"{fed}/accepted/alice/{sha}")


def test_multipart_upload_under_client_keys(auth_s3, world, tmp_path):
    fed, admin = world
    keys = provision_iam_client(auth_s3.client("iam"), auth_s3.bucket, PREFIX, fed, "carol")
    store = _client_store(auth_s3, keys)
    store.multipart_threshold = store.part_size = 5 * 1024 * 1024
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 45_000)
    store.put_file(f"{fed}/deltas/carol/big", big)
    assert admin.get_bytes(f"{fed}/deltas/carol/big") == big.read_bytes()


def test_provisioning_is_idempotent_and_rotates_the_key(auth_s3, world):
    fed, _ = world
    iam = auth_s3.client("iam")
    first = provision_iam_client(iam, auth_s3.bucket, PREFIX, fed, "dave")
    second = provision_iam_client(iam, auth_s3.bucket, PREFIX, fed, "dave")
    user = iam_user_name(fed, "dave")
    assert first.user == second.user == user and first.access_key_id != second.access_key_id
    keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [second.access_key_id]
    assert iam.list_user_policies(UserName=user)["PolicyNames"] == [POLICY_NAME]
    stored = iam.get_user_policy(UserName=user, PolicyName=POLICY_NAME)["PolicyDocument"]
    assert stored == client_policy(auth_s3.bucket, PREFIX, fed, "dave")  # boto3 parses the JSON back
    _client_store(auth_s3, second).put_bytes(f"{fed}/deltas/dave/x", b"x")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID"):
        _client_store(auth_s3, first).put_bytes(f"{fed}/deltas/dave/y", b"y")  # the rotated-out key


def test_revoke_takes_everything_away(auth_s3, world):
    fed, _ = world
    iam = auth_s3.client("iam")
    keys = provision_iam_client(iam, auth_s3.bucket, PREFIX, fed, "erin")
    _client_store(auth_s3, keys).put_bytes(f"{fed}/deltas/erin/x", b"x")
    assert revoke_iam_client(iam, fed, "erin") is True
    with pytest.raises(StoreError, match="credentials"):
        _client_store(auth_s3, keys).put_bytes(f"{fed}/deltas/erin/y", b"y")
    with pytest.raises(ClientError):
        iam.get_user(UserName=iam_user_name(fed, "erin"))
    assert revoke_iam_client(iam, fed, "erin") is False


def test_long_and_mixed_case_names_provision(auth_s3, world):
    fed, admin = world
    client = "Org-" + "x" * 60
    keys = provision_iam_client(auth_s3.client("iam"), auth_s3.bucket, PREFIX, fed, client)
    assert len(keys.user or "") <= 64
    _client_store(auth_s3, keys).put_bytes(f"{fed}/deltas/{client}/x", b"x")
    assert admin.get_bytes(f"{fed}/deltas/{client}/x") == b"x"


def test_a_foreign_user_of_the_same_name_is_not_taken_over(auth_s3, world):
    fed, _ = world
    iam = auth_s3.client("iam")
    iam.create_user(UserName=iam_user_name(fed, "frank"))  # someone else's, untagged
    with pytest.raises(ConfigError, match="not chorus-mq's user"):
        provision_iam_client(iam, auth_s3.bucket, PREFIX, fed, "frank")
    with pytest.raises(ConfigError, match="not chorus-mq's user"):
        revoke_iam_client(iam, fed, "frank")
    assert iam.list_access_keys(UserName=iam_user_name(fed, "frank"))["AccessKeyMetadata"] == []
