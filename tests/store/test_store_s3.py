"""S3 specifics over real HTTP: retries, error messages, multipart write-once, URLs."""

from __future__ import annotations

import boto3
import pytest

from chorus_mq.errors import ConfigError, ObjectExists, ObjectMissing, StoreError
from chorus_mq.settings import Settings
from chorus_mq.store import open_store
from chorus_mq.store.file import FileStore
from chorus_mq.store.s3 import S3Store

from ..services import free_port


def test_retries_absorb_two_503s(make_s3_store, no_backoff, fault_proxy):
    store = make_s3_store(fault_proxy.url)
    fault_proxy.fail_next(2)
    store.put_bytes("k", b"payload")
    assert fault_proxy.injected == 2 and fault_proxy.requests == 3
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
    # botocore's retries={"max_attempts": 5} counts retries: 1 try + 5 retries.
    assert fault_proxy.requests == 6


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


def test_unreachable_endpoint(make_s3_store, no_backoff):
    store = make_s3_store(f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.raises(StoreError, match="reachable"):
        store.put_bytes("k", b"v")


@pytest.mark.parametrize("op", ["put", "exists", "list", "get"])
def test_missing_bucket_is_explained(make_s3_store, op):
    store = make_s3_store(bucket="no-such-bucket")
    call = {
        "put": lambda: store.put_bytes("k", b"v"),
        "exists": lambda: store.exists("k"),
        "list": lambda: store.list(),
        "get": lambda: store.get_bytes("k"),
    }[op]
    with pytest.raises(StoreError, match="bucket no-such-bucket does not exist.*minio-init"):
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
        "chorus", "federations", "http://minio:9000", "eu-west-1")
    assert s3.url_for("a/b") == "s3://chorus/federations/a/b"
    assert open_store("s3://chorus", settings).url_for("a") == "s3://chorus/a"
    assert open_store(f"file://{tmp_path}", settings).url_for("a") == f"file://{tmp_path}/a"
    monkeypatch.chdir(tmp_path)
    local = open_store("file://./data", settings)
    assert isinstance(local, FileStore) and local.root == str(tmp_path / "data")
    for bad in ("s3://", "s3://Bad_Bucket/x", "s3://b/x", "s3://chorus/../x", "file://data",
                "http://x/y", "/plain/path", "s3://chorus/a//b"):
        with pytest.raises(ConfigError):
            open_store(bad, settings)


def test_default_store_setting_opens(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store(Settings().store, Settings())
    with pytest.raises(ObjectMissing):
        store.get_bytes("x")
