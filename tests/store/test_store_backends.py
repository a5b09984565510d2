"""One behaviour suite, run against both backends (a tmp dir and moto over HTTP)."""

from __future__ import annotations

import hashlib
import os

import pytest

from chorus_mq.errors import (
    ChecksumMismatch,
    ChorusError,
    ConfigError,
    ObjectExists,
    ObjectMissing,
    StoreError,
    TooLarge,
)
from chorus_mq.store import InvalidKey
from chorus_mq.store.base import Head

DATA = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB + 4: more than one read chunk
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def out(tmp_path):
    """An empty download directory, apart from the file store's own."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_put_get_roundtrip(store):
    store.put_bytes("rounds/1/deltas/alice.safetensors", DATA)
    assert store.get_bytes("rounds/1/deltas/alice.safetensors") == DATA
    assert store.size("rounds/1/deltas/alice.safetensors") == len(DATA)
    assert store.exists("rounds/1/deltas/alice.safetensors")


def test_put_file_streams_and_download_verifies(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    store.put_file("d/x.bin", src)
    dest = tmp_path / "out" / "x.bin"
    assert store.download("d/x.bin", dest, expected_sha256=SHA.upper(), max_bytes=len(DATA)) == SHA
    assert dest.read_bytes() == DATA
    assert os.listdir(dest.parent) == ["x.bin"]  # no temp file left behind


def test_empty_object(store, tmp_path):
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.size("empty") == 0
    assert store.download("empty", tmp_path / "e") == hashlib.sha256(b"").hexdigest()
    assert store.get_range("empty", 0, 10) == b""


def test_write_once_conflict_keeps_first(store, tmp_path):
    store.put_bytes("k", b"first")
    with pytest.raises(ObjectExists, match="k"):
        store.put_bytes("k", b"second")
    src = tmp_path / "f"
    src.write_bytes(b"third")
    with pytest.raises(ObjectExists):
        store.put_file("k", src)
    assert store.get_bytes("k") == b"first"
    assert store.list() == ["k"]  # a failed write leaves no temp object behind


def test_overwrite_when_not_write_once(store):
    store.put_bytes("k", b"first")
    store.put_bytes("k", b"second", write_once=False)
    assert store.get_bytes("k") == b"second"


def test_missing_key(store, out):
    assert store.size("nope/x") is None
    assert not store.exists("nope/x")
    for call in (
        lambda: store.get_bytes("nope/x"),
        lambda: store.get_range("nope/x", 0, 4),
        lambda: store.get_range("nope/x", 0, 0),
        lambda: store.download("nope/x", out / "d"),
    ):
        with pytest.raises(ObjectMissing, match="nope/x"):
            call()
    assert not (out / "d").exists()
    store.delete("nope/x")  # idempotent, like S3


def test_sha_mismatch_names_both_hashes(store, out):
    store.put_bytes("k", DATA)
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as info:
        store.download("k", out / "d", expected_sha256=wrong)
    assert SHA in str(info.value) and wrong in str(info.value)
    assert os.listdir(out) == []  # neither dest nor a temp file


def test_too_large_checked_before_download(store, monkeypatch, out):
    store.put_bytes("k", DATA)
    fetched = []
    original = type(store)._chunks
    monkeypatch.setattr(type(store), "_chunks", lambda *a: fetched.append(1) or original(*a))
    with pytest.raises(TooLarge, match=str(len(DATA))):
        store.download("k", out / "d", max_bytes=len(DATA) - 1)
    assert fetched == [] and os.listdir(out) == []


def test_short_read_is_transient_not_a_bad_checksum(store, monkeypatch, out):
    # Forces what a cut connection or a replaced object produces: fewer bytes than HEAD said.
    store.put_bytes("k", DATA)
    real_head = type(store)._head
    monkeypatch.setattr(type(store), "_head", lambda s, k: Head(real_head(s, k).size + 1))
    with pytest.raises(StoreError, match="retry") as info:
        store.download("k", out / "d", expected_sha256="0" * 64)
    assert not isinstance(info.value, ChecksumMismatch)
    assert os.listdir(out) == []


def test_download_replaces_existing_dest(store, out):
    store.put_bytes("k", b"new")
    (out / "d").write_bytes(b"old contents")
    store.download("k", out / "d")
    assert (out / "d").read_bytes() == b"new"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "../up",
        "a/../b",
        "a/..",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "a\\b",
        "a\x00b",
        "line\nbreak",
        ".hidden",
        "a/.chorus-x.part",
    ],
)
def test_path_tricks_rejected(store, key, out):
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.download(key, out / "d"),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidKey) as info:
            call()
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert store.list() == []


def test_bad_list_prefix_rejected(store):
    for prefix in ("../", "/x", "a//"):
        with pytest.raises(InvalidKey):
            store.list(prefix)


def test_list_is_sorted_string_prefix(store):
    keys = ["r/2/b", "r/10/a", "r/1/z", "r/1/a", "s/x", "r1"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert store.list() == sorted(keys)
    assert store.list("r/") == ["r/1/a", "r/1/z", "r/10/a", "r/2/b"]
    assert store.list("r/1") == ["r/1/a", "r/1/z", "r/10/a"]  # not a directory match
    assert store.list("r") == ["r/1/a", "r/1/z", "r/10/a", "r/2/b", "r1"]
    assert store.list("q") == [] and store.list("r/3/") == []
    store.delete("r/1/a")
    assert store.list("r/1/") == ["r/1/z"]


def test_ranges_slice_semantics(store):
    store.put_bytes("k", DATA)
    for start, end in [
        (0, 8),
        (5, 6),
        (1000, 300000),
        (len(DATA) - 4, len(DATA)),
        (len(DATA) - 2, len(DATA) + 100),
        (len(DATA), len(DATA) + 5),
        (len(DATA) + 10, len(DATA) + 20),
        (7, 7),
    ]:
        assert store.get_range("k", start, end) == DATA[start:end], (start, end)
    for start, end in [(-1, 3), (5, 4)]:
        with pytest.raises(ValueError):
            store.get_range("k", start, end)


def test_bad_expected_sha_rejected(store, out):
    store.put_bytes("k", b"x")
    with pytest.raises(ValueError, match="64 hex"):
        store.download("k", out / "d", expected_sha256="abc")


def test_put_file_missing_source(store, tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        store.put_file("k", tmp_path / "absent")
    assert not store.exists("k")


def test_url_for_names_the_object(store):
    url = store.url_for("a/b.bin")
    assert url.endswith("/a/b.bin") and url.split("://")[0] in ("s3", "file")


def test_errors_are_chorus_errors(store):
    with pytest.raises(ChorusError):
        store.get_bytes("missing")


# -- streamed and ranged reads ----------------------------------------------------------------


def test_stream_yields_exact_ranges(store):
    store.put_bytes("k", DATA)
    assert b"".join(store.stream("k")) == DATA
    for start, end in [(0, 8), (5, 6), (1000, 300000), (len(DATA) - 4, None), (len(DATA) - 2, len(DATA) + 100)]:
        assert b"".join(store.stream("k", start, end)) == DATA[start:end], (start, end)
    assert list(store.stream("k", len(DATA), len(DATA) + 5)) == []
    assert list(store.stream("k", 7, 7)) == []
    chunks = list(store.stream("k"))
    assert len(chunks) > 1  # chunked, not one buffer
    for start, end in [(-1, 3), (5, 4)]:
        with pytest.raises(ValueError):
            store.stream("k", start, end)


def test_stream_checks_existence_before_the_first_chunk(store):
    with pytest.raises(ObjectMissing, match="nope"):
        store.stream("nope")  # raised by the call itself, not by iterating


def test_stream_short_read_is_a_store_error(store, monkeypatch):
    # Forces what a cut connection produces: fewer bytes arrive than the object was sized at.
    store.put_bytes("k", DATA)
    real_head = type(store)._head
    monkeypatch.setattr(type(store), "_head", lambda s, k: Head(real_head(s, k).size + 1))
    with pytest.raises(StoreError, match="retry"):
        b"".join(store.stream("k"))


# -- verified local files -------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path):
    path = tmp_path / "spool"
    path.mkdir()
    return path


def test_local_copy_is_verified_and_released(store, spool):
    store.put_bytes("d/x.safetensors", DATA)
    with store.local_copy("d/x.safetensors", expected_sha256=SHA.upper(), max_bytes=len(DATA), spool_dir=spool) as obj:
        assert obj.path.read_bytes() == DATA
        assert (obj.sha256, obj.size) == (SHA, len(DATA))
        path, owned = obj.path, obj.owned
        assert (path.parent == spool) is owned  # spooled exactly when it is a copy
    assert os.listdir(spool) == []  # a spooled copy is gone after close
    assert path.exists() is not owned  # ... and the store's own object stays
    obj.close()  # twice is fine
    assert store.get_bytes("d/x.safetensors") == DATA


def test_local_copy_without_expected_hash_reports_it(store, spool):
    store.put_bytes("k", b"abc")
    with store.local_copy("k", expected_sha256=None, max_bytes=None, spool_dir=spool) as obj:
        assert obj.sha256 == hashlib.sha256(b"abc").hexdigest() and obj.size == 3


def test_local_copy_wrong_hash_leaves_nothing(store, spool):
    store.put_bytes("k", DATA)
    with pytest.raises(ChecksumMismatch) as info:
        store.local_copy("k", expected_sha256="0" * 64, max_bytes=None, spool_dir=spool)
    assert SHA in str(info.value)
    assert os.listdir(spool) == []
    assert store.get_bytes("k") == DATA


def test_local_copy_size_limit_before_reading(store, spool, monkeypatch):
    store.put_bytes("k", DATA)
    read = []
    original = type(store)._materialise
    monkeypatch.setattr(type(store), "_materialise", lambda *a: read.append(1) or original(*a))
    with pytest.raises(TooLarge, match=str(len(DATA))):
        store.local_copy("k", expected_sha256=SHA, max_bytes=len(DATA) - 1, spool_dir=spool)
    assert read == [] and os.listdir(spool) == []


def test_local_copy_short_read_is_transient(store, spool, monkeypatch):
    store.put_bytes("k", DATA)
    real_head = type(store)._head
    monkeypatch.setattr(type(store), "_head", lambda s, k: Head(real_head(s, k).size + 1))
    with pytest.raises(StoreError, match="retry") as info:
        store.local_copy("k", expected_sha256=SHA, max_bytes=None, spool_dir=spool)
    assert not isinstance(info.value, ChecksumMismatch)
    assert os.listdir(spool) == []


def test_local_copy_missing_and_bad_arguments(store, spool):
    with pytest.raises(ObjectMissing, match="nope"):
        store.local_copy("nope", expected_sha256=None, max_bytes=None, spool_dir=spool)
    store.put_bytes("k", b"x")
    with pytest.raises(ValueError, match="64 hex"):
        store.local_copy("k", expected_sha256="abc", max_bytes=None, spool_dir=spool)
    with pytest.raises(InvalidKey):
        store.local_copy("../k", expected_sha256=None, max_bytes=None, spool_dir=spool)


# -- server-side copy ---------------------------------------------------------------------------


def test_copy_is_write_once(store):
    store.put_bytes("F/deltas/c/x", DATA)
    store.copy("F/deltas/c/x", "F/accepted/c/x")
    assert store.get_bytes("F/accepted/c/x") == DATA
    store.put_bytes("other", b"other")
    with pytest.raises(ObjectExists, match="accepted/c/x"):
        store.copy("other", "F/accepted/c/x")
    assert store.get_bytes("F/accepted/c/x") == DATA
    assert store.list() == ["F/accepted/c/x", "F/deltas/c/x", "other"]


def test_copy_of_a_missing_source(store):
    with pytest.raises(ObjectMissing, match="nope"):
        store.copy("nope", "dst")
    assert not store.exists("dst")
    with pytest.raises(InvalidKey):
        store.copy("a", "../b")


def test_copy_binds_to_the_version_that_was_verified(store, spool):
    store.put_bytes("src", DATA)
    with store.local_copy("src", expected_sha256=SHA, max_bytes=None, spool_dir=spool) as obj:
        etag = obj.etag
    assert etag
    store.put_bytes("src", b"swapped by its writer", write_once=False)
    with pytest.raises(StoreError, match="replaced"):
        store.copy("src", "dst", if_etag=etag)
    assert not store.exists("dst")
    with store.local_copy("src", expected_sha256=None, max_bytes=None, spool_dir=spool) as obj:
        store.copy("src", "dst", if_etag=obj.etag)
    assert store.get_bytes("dst") == b"swapped by its writer"


# -- streamed write-once outputs ----------------------------------------------------------------


def _shard_key(sha: str) -> str:
    return f"F/rounds/000001/shard-000-adapter-{sha[:16]}.safetensors"


def test_writer_names_the_object_by_its_content(store):
    with store.writer(_shard_key) as w:
        w.file.write(DATA[:1000])
        w.file.write(DATA[1000:])
    assert w.result.key == _shard_key(SHA)
    assert (w.result.sha256, w.result.size, w.result.existed) == (SHA, len(DATA), False)
    assert store.get_bytes(w.result.key) == DATA
    assert store.list() == [w.result.key]


def test_writer_through_its_path(store):
    with store.writer(_shard_key) as w:
        w.file.close()
        w.path.write_bytes(b"written by another writer")  # as a safetensors StreamingWriter would
    sha = hashlib.sha256(b"written by another writer").hexdigest()
    assert w.result.sha256 == sha and store.get_bytes(_shard_key(sha)) == b"written by another writer"


def test_writer_identical_object_is_fine_other_content_is_not(store):
    with store.writer(_shard_key) as first:
        first.file.write(DATA)
    with store.writer(_shard_key) as again:
        again.file.write(DATA)
    assert again.result.key == first.result.key and again.result.existed
    with pytest.raises(ObjectExists, match="other content"), store.writer(lambda sha: first.result.key) as w:
        w.file.write(b"different bytes under a key that does not name them")
    assert store.get_bytes(first.result.key) == DATA
    assert store.list() == [first.result.key]


def test_writer_leaves_nothing_on_error(store, tmp_path):
    with pytest.raises(RuntimeError, match="boom"), store.writer(_shard_key) as w:
        w.file.write(DATA)
        raise RuntimeError("boom")
    assert not w.path.exists()
    with pytest.raises(RuntimeError, match="only when"):
        w.result  # noqa: B018 - the property raises
    with pytest.raises(KeyError), store.writer(lambda sha: {}[sha]) as w2:
        w2.file.write(b"x")
    with pytest.raises(InvalidKey), store.writer(lambda sha: f"../{sha}") as w3:
        w3.file.write(b"x")
    assert not w2.path.exists() and not w3.path.exists()
    assert store.list() == []


def test_writer_empty_object(store):
    with store.writer(lambda sha: f"e/{sha}") as w:
        pass
    assert w.result.size == 0 and store.get_bytes(w.result.key) == b""


def test_writer_checks_a_digest_its_caller_reports(store):
    with store.writer(_shard_key) as w:
        w.file.write(DATA)
        w.sha256 = SHA.upper()  # what a streaming writer computed: agrees
    assert w.result.sha256 == SHA
    with pytest.raises(StoreError, match="nothing was stored"), store.writer(lambda sha: f"x/{sha}") as bad:
        bad.file.write(DATA)
        bad.sha256 = "0" * 64
    assert not bad.path.exists() and store.list() == [_shard_key(SHA)]
