"""S3 specifics over real HTTP: retries, error messages, multipart write-once, URLs."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time

import boto3
import pytest

from chorus_mq.errors import ConfigError, ObjectExists, ObjectMissing, StoreError
from chorus_mq.settings import Settings
from chorus_mq.store import open_store
from chorus_mq.store.file import FileStore
from chorus_mq.store.s3 import S3Store

from ..services import free_port
from .s3server import BUCKET, moto_s3

pytestmark = pytest.mark.services  # moto's S3 as a real HTTP server


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chorus_mq.store.s3" and "retrying" in r.getMessage()]


def test_retries_absorb_two_503s(make_s3_store, no_backoff, fault_proxy, caplog):
    caplog.set_level(logging.WARNING, logger="chorus_mq.store.s3")
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(2)
    store.put_bytes("k", b"payload")
    assert fault_proxy.injected == 2 and fault_proxy.requests == 3
    # each retry says so, naming the request, the endpoint and the cause
    lines = _retry_lines(caplog)
    assert len(lines) == 2 and all(fault_proxy.url in line and "HTTP 503" in line for line in lines)
    assert "PutObject" in lines[0] and "attempt 2 of 5" in lines[0] and "attempt 3 of 5" in lines[1]
    fault_proxy.fail_next(2)
    assert store.get_bytes("k") == b"payload"
    assert fault_proxy.injected == 2


def test_write_once_retry_is_safe(make_s3_store, no_backoff, fault_proxy):
    # A retried conditional PUT must not turn into a silent overwrite.
    store = make_s3_store(fault_proxy.url)
    store.put_bytes("k", b"first")
    fault_proxy.fail_next(1)
    with pytest.raises(ObjectExists):
        store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"first"


def test_persistent_503_becomes_store_error(make_s3_store, no_backoff, fault_proxy):
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(1000)
    with pytest.raises(StoreError, match="503") as info:
        store.get_bytes("k")
    assert "retry" in str(info.value)
    assert fault_proxy.requests == Settings().s3_max_attempts == 5  # CHORUS_S3_MAX_ATTEMPTS, the first included


def test_throttling_is_retried_too(make_s3_store, no_backoff, fault_proxy):
    store = make_s3_store(fault_proxy.url)
    store.put_bytes("k", b"v")
    fault_proxy.fail_next(1, status=503, code="SlowDown")
    assert store.exists("k")


def test_auth_error_names_credentials_and_bucket(make_s3_store, no_backoff, fault_proxy, s3_bucket):
    # moto accepts any credentials, so the refusal itself has to be injected.
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(1, status=403, code="InvalidAccessKeyId")
    with pytest.raises(StoreError) as info:
        store.put_bytes("k", b"v")
    msg = str(info.value)
    assert "credentials" in msg and s3_bucket in msg and "AWS_ACCESS_KEY_ID" in msg
    assert fault_proxy.requests == 1  # a 4xx is not retried


def test_missing_credentials(make_s3_store, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID"):
        make_s3_store().exists("k")


#: what a store that cannot be reached may cost a user before the error (3 attempts, backoff under 0.75 s)
UNREACHABLE_BOUND_S = 3.0


def test_unreachable_endpoint_fails_within_seconds_naming_it(make_s3_store, caplog):
    caplog.set_level(logging.WARNING, logger="chorus_mq.store.s3")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    store = make_s3_store(endpoint)
    for call in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k")):
        caplog.clear()
        started = time.monotonic()
        with pytest.raises(StoreError, match="reachable") as info:
            call()
        assert time.monotonic() - started < UNREACHABLE_BOUND_S  # real backoff: no fixture zeroes it here
        assert f"at {endpoint}" in str(info.value) and "CHORUS_S3_ENDPOINT_URL" in str(info.value)
        lines = _retry_lines(caplog)
        assert len(lines) == 2 and "attempt 3 of 3" in lines[-1] and endpoint in lines[-1]


def test_a_store_that_went_down_fails_within_seconds(s3_bucket):
    """moto's server stopped under a store that was working: the next request fails fast and says where."""
    with moto_s3(s3_bucket) as endpoint:
        store = open_store(f"s3://{s3_bucket}/down", Settings(s3_endpoint_url=endpoint))
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"at {re.escape(endpoint)}.*reachable"):
        store.get_bytes("k")
    assert time.monotonic() - started < UNREACHABLE_BOUND_S


def test_a_stalled_store_times_out_at_the_read_timeout(no_backoff, fault_proxy, monkeypatch):
    monkeypatch.setenv("CHORUS_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("CHORUS_S3_MAX_ATTEMPTS", "2")
    store = open_store(f"s3://{BUCKET}/stall", Settings(s3_endpoint_url=fault_proxy.url))
    assert isinstance(store, S3Store) and store.transport.read_timeout == 0.5 and store.transport.max_attempts == 2
    fault_proxy.fail_next(2, mode="stall")
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"Read timeout.*Retry later"):
        store.get_bytes("k")
    assert fault_proxy.injected == 2 and time.monotonic() - started < 5  # 2 x 0.5 s, not botocore's 2 x 60 s


@pytest.mark.parametrize("op", ["put", "exists", "list", "get"])
def test_missing_bucket_is_explained(make_s3_store, op):
    store = make_s3_store(bucket="no-such-bucket")
    call = {
        "put": lambda: store.put_bytes("k", b"v"),
        "exists": lambda: store.exists("k"),
        "list": store.list,
        "get": lambda: store.get_bytes("k"),
    }[op]
    with pytest.raises(StoreError, match=r"bucket no-such-bucket does not exist.*minio-init"):
        call()


def test_multipart_upload_and_write_once(make_s3_store, s3_endpoint, s3_bucket, tmp_path):
    store = make_s3_store()
    store.multipart_threshold = store.part_size = 5 * 1024 * 1024  # S3's minimum part
    data = bytes(range(251)) * 50_000  # ~12 MiB: three parts
    src = tmp_path / "big"
    src.write_bytes(data)
    store.put_file("big", src)
    assert store.get_bytes("big") == data
    with pytest.raises(ObjectExists):
        store.put_file("big", src)
    # The atomic guarantee is If-None-Match on completion, not the early HEAD check:
    # skip that check, as a racing writer would, and the completion must still refuse.
    with open(src, "rb") as f, pytest.raises(ObjectExists):
        store._multipart("big", f, {"IfNoneMatch": "*"})
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=s3_bucket, Prefix=store.prefix)
    assert store.get_bytes("big") == data


def test_object_changed_between_head_and_get(make_s3_store, tmp_path, monkeypatch):
    store = make_s3_store()
    store.put_bytes("k", b"one")
    real_head = S3Store._head

    def head_then_replace(self, key):
        head = real_head(self, key)
        self.put_bytes(key, b"two", write_once=False)  # a writer sneaks in
        return head

    monkeypatch.setattr(S3Store, "_head", head_then_replace)
    with pytest.raises(StoreError, match="changed"):
        store.download("k", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_client_is_recreated_after_fork(make_s3_store, monkeypatch):
    store = make_s3_store()
    first = store.client
    assert store.client is first
    monkeypatch.setattr("os.getpid", lambda: -1)
    assert store.client is not first


def test_open_store_urls(tmp_path, monkeypatch):
    settings = Settings(s3_endpoint_url="http://minio:9000", s3_region="eu-west-1")
    s3 = open_store("s3://chorus/federations/", settings)
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "chorus",
        "federations",
        "http://minio:9000",
        "eu-west-1",
    )
    assert s3.url_for("a/b") == "s3://chorus/federations/a/b"
    assert open_store("s3://chorus", settings).url_for("a") == "s3://chorus/a"
    assert open_store(f"file://{tmp_path}", settings).url_for("a") == f"file://{tmp_path}/a"
    monkeypatch.chdir(tmp_path)
    local = open_store("file://./data", settings)
    assert isinstance(local, FileStore) and local.root == str(tmp_path / "data")
    for bad in (
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://b/x",
        "s3://chorus/../x",
        "file://data",
        "http://x/y",
        "/plain/path",
        "s3://chorus/a//b",
    ):
        with pytest.raises(ConfigError):
            open_store(bad, settings)


def test_default_store_setting_opens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store(Settings().store, Settings())
    with pytest.raises(ObjectMissing):
        store.get_bytes("x")


# -- what each operation sends -------------------------------------------------------------------

#: every S3 operation that s3:PutObject or s3:GetObject on the object itself allows
PUT_OR_GET = {"PutObject", "HeadObject", "GetObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}


def _record(store):
    """Record (operation, parameters) of every request the store's boto3 client makes."""
    calls: list[tuple[str, dict]] = []
    store.client.meta.events.register(
        "provide-client-params.s3", lambda params, model, **kw: calls.append((model.name, dict(params)))
    )
    return calls


def test_client_side_operations_need_only_put_and_get(make_s3_store, tmp_path):
    # A federation client's keys allow PutObject/GetObject and nothing else: no HeadBucket, no ListBucket.
    store = make_s3_store()
    store.multipart_threshold = store.part_size = 5 * 1024 * 1024
    calls = _record(store)
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 45_000)  # ~11 MiB: a multipart upload
    small = tmp_path / "small"
    small.write_bytes(b"delta bytes")
    assert store.size("d/absent") is None and not store.exists("d/absent")
    store.put_file("d/big", big)
    store.put_file("d/small", small)
    store.put_bytes("d/bytes", b"b")
    assert store.size("d/small") == 11
    store.download("d/small", tmp_path / "back", expected_sha256=hashlib.sha256(b"delta bytes").hexdigest())
    with store.local_copy("d/big", expected_sha256=None, max_bytes=None, spool_dir=tmp_path / "spool") as obj:
        assert obj.size == big.stat().st_size
    assert store.get_bytes("d/bytes") == b"b"
    assert store.get_range("d/small", 0, 5) == b"delta"
    assert b"".join(store.stream("d/small", 6)) == b"bytes"
    ops = {name for name, _ in calls}
    assert ops <= PUT_OR_GET, ops - PUT_OR_GET
    assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= ops


def test_ranges_and_streams_are_ranged_conditional_gets(make_s3_store):
    store = make_s3_store()
    store.put_bytes("k", b"0123456789")
    etag = store._head("k").etag
    calls = _record(store)
    assert store.get_range("k", 2, 5) == b"234"
    assert b"".join(store.stream("k", 4, 6)) == b"45"
    assert b"".join(store.stream("k")) == b"0123456789"
    # Sizing is a one-byte ranged GET (s3:GetObject, like every read), never a HeadObject.
    assert [params.get("Range") for name, params in calls if name == "GetObject"].count("bytes=0-0") == 2
    assert not any(name == "HeadObject" for name, _ in calls)
    gets = [params for name, params in calls if name == "GetObject" and params.get("Range") != "bytes=0-0"]
    assert gets[0]["Range"] == "bytes=2-4"
    assert gets[1]["Range"] == "bytes=4-5" and gets[1]["IfMatch"] == etag
    assert "Range" not in gets[2] and gets[2]["IfMatch"] == etag


def test_copy_is_server_side_and_conditional(make_s3_store):
    store = make_s3_store()
    store.put_bytes("F/deltas/c/x", b"delta")
    etag = store._head("F/deltas/c/x").etag
    calls = _record(store)
    store.copy("F/deltas/c/x", "F/accepted/c/x")
    # no bytes through us: two one-byte sizing GETs, then the server-side copy
    assert [(name, params.get("Range")) for name, params in calls] == [
        ("GetObject", "bytes=0-0"),
        ("GetObject", "bytes=0-0"),
        ("CopyObject", None),
    ]
    params = calls[-1][1]
    assert params["CopySourceIfMatch"] == etag and params["IfNoneMatch"] == "*"
    assert params["CopySource"] == {"Bucket": store.bucket, "Key": f"{store.prefix}/F/deltas/c/x"}
    assert store.get_bytes("F/accepted/c/x") == b"delta"


def test_copy_refused_by_a_changed_source(make_s3_store, fault_proxy):
    # moto does not evaluate CopySourceIfMatch; S3 and MinIO answer 412, which the proxy plays here.
    store = make_s3_store(fault_proxy.url)
    store.put_bytes("src", b"v1")
    fault_proxy.fail_next(1, status=412, code="PreconditionFailed", match=r"^PUT .*/dst")
    with pytest.raises(StoreError, match="changed since it was sized") as info:
        store.copy("src", "dst")
    assert not isinstance(info.value, ObjectExists) and fault_proxy.injected == 1
    assert not store.exists("dst")


def test_copy_in_parts_above_the_single_copy_limit(make_s3_store, s3_endpoint, s3_bucket):
    store = make_s3_store()
    store.copy_limit = store.copy_part_size = 5 * 1024 * 1024
    data = bytes(range(251)) * 50_000  # ~12 MiB: three part copies
    store.put_bytes("big", data)
    etag = store._head("big").etag
    calls = _record(store)
    store.copy("big", "big-copy")
    parts = [params for name, params in calls if name == "UploadPartCopy"]
    assert [p["CopySourceRange"] for p in parts] == [
        "bytes=0-5242879",
        "bytes=5242880-10485759",
        f"bytes=10485760-{len(data) - 1}",
    ]
    assert all(p["CopySourceIfMatch"] == etag for p in parts)
    assert not any(name in ("PutObject", "UploadPart") for name, _ in calls)
    assert all(params["Range"] == "bytes=0-0" for name, params in calls if name == "GetObject")  # sizing only
    assert store.get_bytes("big-copy") == data
    with pytest.raises(ObjectExists):
        store.copy("big", "big-copy")
    # The atomic guarantee is If-None-Match on completion: skip the early check, as a racer would.
    source = {"Bucket": store.bucket, "Key": f"{store.prefix}/big"}
    with pytest.raises(ObjectExists):
        store._multipart_copy("big", "big-copy", store._head("big"), source, {})
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=s3_bucket, Prefix=store.prefix)


def test_local_copy_and_writer_use_the_configured_spool(s3_endpoint, s3_bucket, tmp_path):
    spool = tmp_path / "spool"
    settings = Settings(s3_endpoint_url=s3_endpoint, s3_region="us-east-1", spool_dir=str(spool))
    store = open_store(f"s3://{s3_bucket}/t-spool-{os.getpid()}-{id(tmp_path)}", settings)
    store.put_bytes("k", b"spooled")
    with store.local_copy("k", expected_sha256=None, max_bytes=None) as obj:
        assert obj.owned and obj.path.parent == spool and obj.path.read_bytes() == b"spooled"
    assert os.listdir(spool) == []
    with store.writer(lambda sha: f"out/{sha}") as w:
        assert w.path.parent == spool
        w.file.write(b"output")
    assert store.get_bytes(w.result.key) == b"output" and os.listdir(spool) == []


def test_writer_uploads_large_outputs_in_parts(make_s3_store):
    store = make_s3_store()
    store.multipart_threshold = store.part_size = 5 * 1024 * 1024
    calls = _record(store)
    data = bytes(range(253)) * 45_000
    with store.writer(lambda sha: f"out/{sha}") as w:
        for i in range(0, len(data), 1 << 20):
            w.file.write(data[i : i + (1 << 20)])
    assert w.result.sha256 == hashlib.sha256(data).hexdigest() and w.result.size == len(data)
    assert store.get_bytes(w.result.key) == data
    assert sum(name == "UploadPart" for name, _ in calls) == 3


# -- refusals name the key and the permission --------------------------------------------------


@pytest.mark.parametrize(
    ("op", "method", "permission"),
    [("put", "PUT", "s3:PutObject"), ("delete", "DELETE", "s3:DeleteObject"), ("list", "GET", "s3:ListBucket")],
)
def test_access_denied_names_key_and_permission(make_s3_store, no_backoff, fault_proxy, op, method, permission):
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(1, status=403, code="AccessDenied", match=f"^{method} ")
    call = {
        "put": lambda: store.put_bytes("F/deltas/bob/x", b"v"),
        "delete": lambda: store.delete("F/deltas/bob/x"),
        "list": lambda: store.list("F/"),
    }[op]
    with pytest.raises(StoreError) as info:
        call()
    msg = str(info.value)
    assert permission in msg and "F/" in msg and "AccessDenied" in msg
    assert fault_proxy.requests == 1  # a refusal is not retried


def test_head_refusal_explains_missing_list_right(make_s3_store, no_backoff, fault_proxy):
    # Sizing is a GET: without s3:ListBucket, S3 answers a missing key with 403.
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(1, status=403, code="AccessDenied", match="^GET ")
    with pytest.raises(StoreError) as info:
        store.size("F/deltas/bob/x")
    msg = str(info.value)
    assert "F/deltas/bob/x" in msg and "s3:GetObject" in msg and "s3:ListBucket" in msg
