"""``file:///path``: a local directory, for development, tests and single-host setups.

Objects are read-only files (mode 0o444) put in place by a hard link of a complete temp file,
so readers never see a partial object and write-once is the atomic ``link()``. A symbolic link
in the tree is never an object: nothing here follows one to read, copy or link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ..errors import ChorusError, ObjectExists, ObjectMissing, StoreError
from .base import Store
from .objects import Head, LocalObject
from .spool import READ_ONLY, fsync_dir, hash_fd, pread_all, pread_chunks, read_chunks, unlink, write_temp

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs us
# link() refusing for these reasons means "not here", not "already exists": copy the bytes instead.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def _version(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FileStore(Store):
    """Objects as files under ``root``."""

    _durable_writes = True

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def url_for(self, key: str) -> str:
        return f"file://{self.root}/{key}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    # -- primitives -------------------------------------------------------------------
    def _head(self, key: str) -> Head | None:
        try:
            with self._errors(key, "stat"):
                st = os.lstat(self._path(key))
        except ObjectMissing:
            return None
        # A directory is only a common prefix of other keys, as on S3; a symlink is not ours.
        return Head(size=st.st_size, etag=_version(st)) if stat.S_ISREG(st.st_mode) else None

    def _chunks(self, key: str, head: Head, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        fd = self._open(key, head)
        try:
            with self._errors(key, "read"):
                yield from pread_chunks(fd, start, sys.maxsize if end is None else end)
        finally:
            os.close(fd)

    def _range(self, key: str, start: int, end: int) -> bytes:
        fd = self._open(key, None)
        try:
            with self._errors(key, "read"):
                return pread_all(fd, start, end)
        finally:
            os.close(fd)

    def _materialise(self, key: str, head: Head, spool_dir: str) -> LocalObject:
        # The object itself, hashed where it lies: no copy, and nothing read twice.
        fd = self._open(key, head)
        try:
            with self._errors(key, "read"):
                digest, count = hash_fd(fd, head.size + 1)
        except BaseException:
            os.close(fd)
            raise
        return LocalObject(self._path(key), sha256=digest, size=count, etag=head.etag, owned=False, fd=fd)

    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None:
        final = self._path(key)
        self._mkdirs(key)
        # Readers must never see a partial object: write and fsync a temp file beside it first.
        tmp, _, _ = write_temp(os.path.dirname(final), read_chunks(src, size))
        try:
            self._install(tmp, key, write_once)
        finally:
            unlink(tmp)

    def _writer_dir(self) -> str:
        # Inside the store, so the finished file is linked into place, never copied.
        return self.root

    def _place(self, tmp: str, key: str, size: int) -> None:
        self._install(tmp, key, write_once=True)

    def _copy(self, src: str, dst: str, head: Head) -> None:
        fd = self._open(src, head)
        try:
            final = self._path(dst)
            self._mkdirs(dst)
            with self._errors(dst, "copy to", write=True):
                if self._can_share(fd):
                    try:
                        os.link(self._path(src), final, follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in _NO_LINK:
                            raise
                    else:
                        self._check_linked(src, dst, fd)
                        fsync_dir(os.path.dirname(final))
                        return
                tmp, _, count = write_temp(os.path.dirname(final), pread_chunks(fd, 0, head.size + 1))
                try:
                    if count != head.size:
                        raise StoreError(f"{self.url_for(src)} changed during the copy; retry")
                    self._install(tmp, dst, write_once=True)
                finally:
                    unlink(tmp)
        finally:
            os.close(fd)

    def _list(self, prefix: str) -> Iterable[str]:
        # Walk only the deepest directory the prefix names, then filter like S3 does.
        top = self._path(prefix.rpartition("/")[0]) if "/" in prefix else self.root
        for dirpath, dirnames, filenames in os.walk(top, onerror=_walk_error):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if name.startswith("."):  # temp files of writes in progress
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def _delete(self, key: str) -> None:
        with contextlib.suppress(ObjectMissing), self._errors(key, "delete", write=True):
            os.unlink(self._path(key))

    # -- helpers ----------------------------------------------------------------------
    def _open(self, key: str, head: Head | None) -> int:
        """An fd on the object (never through a symlink), checked to be the version ``head`` sized."""
        with self._errors(key, "read"):
            try:
                fd = os.open(self._path(key), _OPEN_FLAGS)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ObjectMissing(f"object {self.url_for(key)} does not exist (it is a symbolic link)") from exc
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ObjectMissing(f"object {self.url_for(key)} does not exist (not a regular file)")
            if head is not None and head.etag is not None and _version(st) != head.etag:
                raise StoreError(f"{self.url_for(key)} changed while being read; retry")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _mkdirs(self, key: str) -> None:
        try:
            os.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory for {self.url_for(key)}: {exc.strerror or exc}{_mkdir_hint(exc)}"
            ) from exc

    def _install(self, tmp: str, key: str, write_once: bool) -> None:
        """Make the complete temp file ``tmp`` the object ``key``: read-only, atomically, durably."""
        final = self._path(key)
        self._mkdirs(key)
        with self._errors(key, "write", write=True):
            os.chmod(tmp, READ_ONLY)
            if write_once:
                # link() fails if the name exists, atomically.
                try:
                    os.link(tmp, final, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    # The writer's temp file is on another device than the key's directory.
                    with open(tmp, "rb") as src:
                        near, _, _ = write_temp(os.path.dirname(final), read_chunks(src))
                    try:
                        os.chmod(near, READ_ONLY)
                        os.link(near, final, follow_symlinks=False)
                    finally:
                        unlink(near)
            else:
                os.replace(tmp, final)
            fsync_dir(os.path.dirname(final))

    def _can_share(self, fd: int) -> bool:
        """Whether the source inode may be shared by a hard link: only once nobody can write it."""
        st = os.fstat(fd)
        if not st.st_mode & 0o222:
            return True
        try:
            os.fchmod(fd, READ_ONLY)
        except PermissionError:
            return False  # someone else's file: copy the bytes, then only we hold the copy
        return True

    def _check_linked(self, src: str, dst: str, fd: int) -> None:
        # The source name could have been swapped after we opened it; the copy must be what we sized.
        st, linked = os.fstat(fd), os.lstat(self._path(dst))
        if (st.st_dev, st.st_ino) != (linked.st_dev, linked.st_ino):
            unlink(self._path(dst))
            raise StoreError(f"{self.url_for(src)} was replaced during the copy; retry")

    @contextlib.contextmanager
    def _errors(self, key: str, op: str, *, write: bool = False) -> Iterator[None]:
        """Map OSErrors to ChorusErrors the way the S3 backend maps HTTP errors."""
        try:
            yield
        except ChorusError:
            raise
        except FileExistsError as exc:
            raise ObjectExists(f"object {self.url_for(key)} already exists (write-once)") from exc
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            if write and not isinstance(exc, FileNotFoundError):
                raise StoreError(f"cannot {op} {self.url_for(key)}: {exc.strerror}") from exc
            raise ObjectMissing(f"object {self.url_for(key)} does not exist") from exc
        except OSError as exc:
            raise StoreError(f"cannot {op} {self.url_for(key)}: {exc.strerror or exc}") from exc


def _walk_error(exc: OSError) -> None:
    if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        raise StoreError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc


def _mkdir_hint(exc: OSError) -> str:
    """What a failed ``makedirs`` most likely means, by its errno."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return " (a prefix of the key is a file, not a directory)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return " (no permission to write there: check CHORUS_STORE)"
    return ""
