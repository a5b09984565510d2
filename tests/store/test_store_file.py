"""file:// specifics: reads without copies, hard-linked copies, read-only objects, symlinks."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time

import pytest

from chorus_mq.errors import ObjectExists, ObjectMissing, StoreError
from chorus_mq.settings import Settings
from chorus_mq.store import file as file_backend
from chorus_mq.store import open_store
from chorus_mq.store.file import FileStore

DATA = os.urandom(3 * 1024 * 1024 + 7)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def fs(tmp_path) -> FileStore:
    store = open_store(f"file://{tmp_path}/store", Settings())
    assert isinstance(store, FileStore)
    return store


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _hidden(fs: FileStore) -> list[str]:
    return [name for _, _, files in os.walk(fs.root) for name in files if name.startswith(".")]


def test_objects_are_read_only(fs, tmp_path):
    fs.put_bytes("a/bytes", b"x")
    src = tmp_path / "src"
    src.write_bytes(b"y")
    fs.put_file("a/file", src)
    fs.copy("a/file", "a/copied")
    with fs.writer(lambda sha: f"a/{sha}") as w:
        w.file.write(b"z")
    for key in ("a/bytes", "a/file", "a/copied", w.result.key):
        assert _mode(fs._path(key)) == 0o444, key
    fs.put_bytes("a/bytes", b"replaced", write_once=False)  # overwriting is a rename, still allowed
    assert fs.get_bytes("a/bytes") == b"replaced" and _mode(fs._path("a/bytes")) == 0o444
    assert _hidden(fs) == []


def test_local_copy_is_the_object_itself(fs, tmp_path):
    fs.put_bytes("d/x", DATA)
    spool = tmp_path / "spool"
    with fs.local_copy("d/x", expected_sha256=SHA, max_bytes=len(DATA), spool_dir=spool) as obj:
        assert str(obj.path) == fs._path("d/x") and not obj.owned
        assert os.stat(obj.path).st_ino == os.stat(fs._path("d/x")).st_ino
    assert not spool.exists()  # not even created: nothing was copied
    assert fs.get_bytes("d/x") == DATA


def test_local_copy_of_an_object_replaced_after_sizing(fs, tmp_path, monkeypatch):
    fs.put_bytes("k", DATA)
    real_head = FileStore._head

    def head_then_replace(self, key):
        head = real_head(self, key)
        self.put_bytes(key, DATA[::-1], write_once=False)  # a writer sneaks in (same size, new file)
        return head

    monkeypatch.setattr(FileStore, "_head", head_then_replace)
    with pytest.raises(StoreError, match="changed"):
        fs.local_copy("k", expected_sha256=SHA, max_bytes=None, spool_dir=tmp_path / "spool")


def test_ranges_read_by_offset_not_the_whole_file(fs):
    # A sparse 8 GiB object: reading it whole would take far longer than a pread of its tail.
    fs.put_bytes("big", b"")
    path = fs._path("big")
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(8 * 1024**3)
        f.seek(8 * 1024**3 - 4)
        f.write(b"tail")
    begin = time.perf_counter()
    assert fs.get_range("big", 8 * 1024**3 - 8, 8 * 1024**3 + 100) == b"\0\0\0\0tail"
    assert b"".join(fs.stream("big", 8 * 1024**3 - 6)) == b"\0\0tail"
    assert time.perf_counter() - begin < 1.0


def test_copy_is_a_hard_link(fs):
    fs.put_bytes("F/deltas/c/x", DATA)
    fs.copy("F/deltas/c/x", "F/accepted/c/x")
    src, dst = os.stat(fs._path("F/deltas/c/x")), os.stat(fs._path("F/accepted/c/x"))
    assert (src.st_ino, src.st_nlink) == (dst.st_ino, 2)
    fs.delete("F/deltas/c/x")  # the client's copy going away leaves the accepted one
    assert fs.get_bytes("F/accepted/c/x") == DATA


def test_copy_makes_a_writable_source_read_only_before_sharing_it(fs):
    os.makedirs(os.path.join(fs.root, "d"))
    with open(fs._path("d/src"), "wb") as f:  # placed by something other than the store, mode 0644
        f.write(DATA)
    fs.copy("d/src", "d/dst")
    assert _mode(fs._path("d/src")) == 0o444 and _mode(fs._path("d/dst")) == 0o444
    assert fs.get_bytes("d/dst") == DATA


def test_copy_falls_back_to_bytes_across_devices(fs, monkeypatch):
    fs.put_bytes("src", DATA)
    real_link = os.link
    refused = []

    def link(src, dst, *, follow_symlinks=True):
        if not refused:  # the first link is the cross-device one
            refused.append(dst)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(file_backend.os, "link", link)
    fs.copy("src", "far/dst")
    assert refused == [fs._path("far/dst")]
    assert fs.get_bytes("far/dst") == DATA
    assert os.stat(fs._path("far/dst")).st_ino != os.stat(fs._path("src")).st_ino
    assert _mode(fs._path("far/dst")) == 0o444 and _hidden(fs) == []
    with pytest.raises(ObjectExists):
        fs.copy("src", "far/dst")


def test_symlinks_are_never_objects(fs, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the store")
    os.makedirs(os.path.join(fs.root, "F/deltas/c"))
    os.symlink(secret, fs._path("F/deltas/c/x"))
    assert fs.size("F/deltas/c/x") is None and not fs.exists("F/deltas/c/x")
    for call in (
        lambda: fs.get_bytes("F/deltas/c/x"),
        lambda: fs.get_range("F/deltas/c/x", 0, 4),
        lambda: fs.copy("F/deltas/c/x", "F/accepted/c/x"),
        lambda: fs.local_copy("F/deltas/c/x", expected_sha256=None, max_bytes=None),
    ):
        with pytest.raises(ObjectMissing):
            call()
    assert not os.path.lexists(fs._path("F/accepted/c/x"))
    # A symlink swapped in after the object was sized is refused too (O_NOFOLLOW on the open).
    fs.put_bytes("k", b"real")
    head = fs._head("k")
    os.unlink(fs._path("k"))
    os.symlink(secret, fs._path("k"))
    with pytest.raises(ObjectMissing, match="symbolic link"):
        fs._open("k", head)


def test_writer_writes_in_place_and_links(fs):
    with fs.writer(lambda sha: f"F/rounds/000001/{sha[:16]}.bin") as w:
        assert os.path.dirname(w.path) == fs.root  # inside the store: linked into place, never copied
        w.file.write(DATA)
        temp_inode = os.fstat(w.file.fileno()).st_ino
    final = fs._path(w.result.key)
    assert os.stat(final).st_ino == temp_inode and os.stat(final).st_nlink == 1
    assert _hidden(fs) == [] and fs.list() == [w.result.key]


def test_writer_across_devices_copies_once(fs, monkeypatch):
    real_link = os.link
    calls = []

    def link(src, dst, *, follow_symlinks=True):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(file_backend.os, "link", link)
    with fs.writer(lambda sha: f"far/{sha}") as w:
        w.file.write(DATA)
    assert fs.get_bytes(w.result.key) == DATA and len(calls) == 2
    assert _hidden(fs) == []


def test_key_under_an_object_is_a_store_error(fs):
    fs.put_bytes("a", b"x")
    with pytest.raises(StoreError, match="a/b"):
        fs.put_bytes("a/b", b"y")
    with pytest.raises(StoreError, match="a/b"):
        fs.copy("a", "a/b")
    with pytest.raises(StoreError, match="a/b"), fs.writer(lambda sha: "a/b") as w:
        w.file.write(b"y")
    assert fs.list() == ["a"] and _hidden(fs) == []


def test_a_store_that_cannot_be_created_says_why(tmp_path):
    (tmp_path / "blocker").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"a prefix of the key is a file"):
        open_store(f"file://{tmp_path}", Settings()).put_bytes("blocker/obj", b"data")
    # root writes anywhere, so a permission failure is shown through the errno it would raise
    assert "no permission" in file_backend._mkdir_hint(PermissionError(errno.EACCES, "Permission denied"))
    assert file_backend._mkdir_hint(OSError(errno.ENOSPC, "No space left")) == ""
