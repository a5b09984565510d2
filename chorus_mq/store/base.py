"""The store interface; the size, hash and range checks both backends share live here only."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, cast

from ..errors import ChecksumMismatch, ConfigError, ObjectExists, ObjectMissing, StoreError, TooLarge
from .object_keys import InvalidKey, check_key, check_sha256
from .objects import Head, LocalObject, ObjectWriter, WrittenObject
from .spool import hash_fd, make_temp, unlink, write_temp

__all__ = ["Head", "InvalidKey", "LocalObject", "ObjectWriter", "Store", "WrittenObject", "check_key"]

PathArg = str | os.PathLike[str]


class Store(abc.ABC):
    """Object storage under one prefix. Keys are relative, ``/``-separated.

    Backends implement the underscored primitives on already-validated keys; every
    public method validates keys first.
    """

    #: whether :meth:`writer` fsyncs its local file (for file:// it becomes the stored object itself)
    _durable_writes = False

    # -- primitives ---------------------------------------------------------------
    @abc.abstractmethod
    def _head(self, key: str) -> Head | None: ...

    @abc.abstractmethod
    def _chunks(self, key: str, head: Head, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` (``end=None``: to the object's end) of the version ``head`` names.

        Raise ObjectMissing if it vanished and StoreError if it changed since ``head``.
        """

    @abc.abstractmethod
    def _range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) with end > start, clipped to the object; b"" past its end."""

    @abc.abstractmethod
    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None: ...

    @abc.abstractmethod
    def _copy(self, src: str, dst: str, head: Head) -> None:
        """Copy the version ``head`` names to ``dst``, write-once, without moving bytes through here."""

    @abc.abstractmethod
    def _writer_dir(self) -> str:
        """Where :meth:`writer` creates its local file."""

    @abc.abstractmethod
    def _place(self, tmp: str, key: str, size: int) -> None:
        """Put the finished local file ``tmp`` at ``key`` write-once; the caller removes ``tmp`` after."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterable[str]: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """A URL naming ``key``, for messages and display (not a download link)."""

    def _materialise(self, key: str, head: Head, spool_dir: str) -> LocalObject:
        """The object as a local file, hashed but not yet checked. Default: a spooled download."""
        suffix = "-" + key.rpartition("/")[2]
        tmp, digest, count = write_temp(spool_dir, self._chunks(key, head), head.size + 1, suffix=suffix)
        return LocalObject(tmp, sha256=digest, size=count, etag=head.etag, owned=True)

    # -- writing ----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, write_once: bool = True) -> None:
        """Store ``data``; with ``write_once`` raise ObjectExists if ``key`` exists."""
        self._put(check_key(key), io.BytesIO(data), len(data), write_once)

    def put_file(
        self, key: str, path: PathArg, *, write_once: bool = True, progress: Callable[[int], object] | None = None
    ) -> None:
        """Stream the local file ``path`` to ``key``; write-once as in :meth:`put_bytes`.

        ``progress`` is called with the number of bytes read each time the backend reads a piece.
        """
        check_key(key)
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed by the with below, after fstat
        except OSError as exc:
            raise ConfigError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from exc
        with src:
            size = os.fstat(src.fileno()).st_size
            source: BinaryIO = src if progress is None else cast(BinaryIO, _Counting(src, progress))
            self._put(key, source, size, write_once)

    def copy(self, src_key: str, dst_key: str, *, if_etag: str | None = None) -> None:
        """Copy ``src_key`` to ``dst_key`` inside the store (S3 CopyObject; file: a hard link), write-once.

        ObjectExists if ``dst_key`` exists. With ``if_etag`` (a :attr:`LocalObject.etag`) copy
        only that version of the source: StoreError if it was replaced since.
        """
        check_key(src_key)
        check_key(dst_key)
        head = self._require(src_key)
        if if_etag is not None and head.etag != if_etag:
            raise StoreError(
                f"{self.url_for(src_key)} was replaced since it was read (version {if_etag} is gone); "
                "read and verify it again"
            )
        self._copy(src_key, dst_key, head)

    @contextlib.contextmanager
    def writer(self, key_for: Callable[[str], str]) -> Iterator[ObjectWriter]:
        """Stream one output to a local file; on a clean exit store it write-once at ``key_for(sha256)``.

        The sha256 is of what the file holds at the end; a digest the caller reports in ``.sha256`` is
        checked against it. A caller that hashed every byte it wrote itself in this process (as
        ``StreamingWriter`` does) may set ``.trusted_sha256`` instead: the file is then not read again
        (0.4 s per GB here). An object already at that key with the same content is fine
        (``result.existed``); other content there raises ObjectExists. On an exception nothing is
        stored and the local file is removed.
        """
        fd, tmp = make_temp(self._writer_dir())
        out = ObjectWriter(fd, tmp)
        try:
            yield out
            out._finish_file(durable=self._durable_writes)
            trusted = check_sha256(out.trusted_sha256)
            if trusted is not None:
                digest, size = trusted, os.stat(tmp).st_size
            else:
                digest, size = _hash_path(tmp)
            if out.sha256 is not None and out.sha256.lower() != digest:
                raise StoreError(
                    f"the output file hashes to {digest} but its writer reported {out.sha256}: "
                    "it was changed after it was written; nothing was stored"
                )
            key = check_key(key_for(digest))
            existed = False
            try:
                self._place(tmp, key, size)
            except ObjectExists:
                if not self._holds(key, digest, size):
                    raise ObjectExists(
                        f"object {self.url_for(key)} already exists with other content than the "
                        f"{size} bytes (sha256 {digest}) just written; its key must name its content"
                    ) from None
                existed = True
            out._result = WrittenObject(key=key, sha256=digest, size=size, existed=existed)
        finally:
            if not out.file.closed:
                out.file.close()
            unlink(tmp)

    # -- reading ----------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        """The whole object. Prefer :meth:`download` or :meth:`local_copy` for anything large."""
        return b"".join(self.stream(key))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` like ``data[start:end]``: clipped to the object's size."""
        check_key(key)
        _check_bounds(start, end)
        if start == end:
            # An empty range is not expressible as an HTTP Range; still report a missing key.
            self._require(key)
            return b""
        return self._range(key, start, end)

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` (clipped like a slice; ``end=None``: to the end) in chunks.

        The object is sized first (ObjectMissing now, not at the first chunk); exactly that
        many bytes of that version arrive, or the iteration raises StoreError (retry).
        """
        check_key(key)
        _check_bounds(start, start if end is None else end)
        head = self._require(key)
        stop = head.size if end is None else min(end, head.size)
        if start >= stop:
            return iter(())
        return _exactly(self.url_for(key), self._chunks(key, head, start, stop), stop - start)

    def size(self, key: str) -> int | None:
        """Size in bytes, or None if the object does not exist."""
        head = self._head(check_key(key))
        return None if head is None else head.size

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return self._head(check_key(key)) is not None

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a string prefix, like S3's, not a directory)."""
        return sorted(self._list(check_key(prefix, prefix=True)))

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing object is not an error (idempotent, like S3)."""
        self._delete(check_key(key))

    def download(
        self,
        key: str,
        dest_path: PathArg,
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
    ) -> str:
        """Fetch ``key`` into ``dest_path`` atomically and return its sha256 hex.

        The size is checked before any byte is fetched (TooLarge); the bytes are hashed
        while streaming to a temp file beside ``dest_path``; a short or long read is a
        StoreError (retry), a wrong hash a ChecksumMismatch. Nothing is left at
        ``dest_path`` unless every check passed.
        """
        check_key(key)
        expected = check_sha256(expected_sha256)
        head = self._require(key)
        self._check_limit(key, head, max_bytes)
        dest = os.path.abspath(os.fspath(dest_path))
        # Never read past the advertised size: a replaced object can't overrun the limit.
        tmp, digest, count = write_temp(os.path.dirname(dest), self._chunks(key, head), head.size + 1)
        try:
            self._verify(key, head, count, digest, expected)
            os.replace(tmp, dest)
        except BaseException:
            unlink(tmp)
            raise
        return digest

    def local_copy(
        self,
        key: str,
        *,
        expected_sha256: str | None,
        max_bytes: int | None,
        spool_dir: PathArg | None = None,
    ) -> LocalObject:
        """The object as a verified local file: use as ``with store.local_copy(...) as obj: obj.path``.

        file:// hashes the object in place and returns its own path (no copy); s3:// downloads
        it into ``spool_dir`` (default: the store's spool, else the system temp directory).
        The size limit is checked before reading, the size and sha256 before returning.
        """
        check_key(key)
        expected = check_sha256(expected_sha256)
        head = self._require(key)
        self._check_limit(key, head, max_bytes)
        spool = os.fspath(spool_dir) if spool_dir is not None else self._default_spool()
        local = self._materialise(key, head, spool)
        try:
            self._verify(key, head, local.size, local.sha256, expected)
        except BaseException:
            local.close()
            raise
        return local

    # -- shared checks ------------------------------------------------------------------
    def _default_spool(self) -> str:
        return tempfile.gettempdir()

    def _require(self, key: str) -> Head:
        head = self._head(key)
        if head is None:
            raise ObjectMissing(f"object {self.url_for(key)} does not exist")
        return head

    def _check_limit(self, key: str, head: Head, max_bytes: int | None) -> None:
        if max_bytes is not None and head.size > max_bytes:
            raise TooLarge(f"{self.url_for(key)} is {head.size} bytes, over the limit of {max_bytes}")

    def _verify(self, key: str, head: Head, count: int, digest: str, expected: str | None) -> None:
        url = self.url_for(key)
        # Size before hash: a truncated transfer is transient, not a bad delta.
        _check_count(url, count, head.size)
        if expected is not None and digest != expected:
            raise ChecksumMismatch(
                f"{url}: sha256 is {digest}, expected {expected}; the object is not the one that was announced"
            )

    def _holds(self, key: str, digest: str, size: int) -> bool:
        """Whether ``key`` holds exactly ``size`` bytes hashing to ``digest``."""
        head = self._head(key)
        if head is None or head.size != size:
            return False
        sha = hashlib.sha256()
        count = 0
        for chunk in self._chunks(key, head):
            sha.update(chunk)
            count += len(chunk)
        return count == size and sha.hexdigest() == digest


def _check_bounds(start: int, end: int) -> None:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if not (ints and 0 <= start <= end):
        raise ValueError(f"need 0 <= start <= end, got start={start!r} end={end!r}")


def _exactly(url: str, chunks: Iterator[bytes], expected: int) -> Iterator[bytes]:
    count = 0
    for chunk in chunks:
        count += len(chunk)
        if count > expected:
            break
        yield chunk
    _check_count(url, count, expected)


def _hash_path(path: str) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, sys.maxsize)
    finally:
        os.close(fd)


def _check_count(url: str, count: int, size: int) -> None:
    if count != size:
        raise StoreError(
            f"read {count} bytes of {url} but expected {size}: the transfer was cut short "
            "or the object was replaced meanwhile; retry"
        )


class _Counting(io.RawIOBase):
    """A read-only file that reports how many bytes each read returned (for progress bars)."""

    def __init__(self, raw: BinaryIO, report: Callable[[int], object]):
        super().__init__()
        self._raw, self._report = raw, report

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        buffer[: len(data)] = data
        self._report(len(data))
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._report(len(data))
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()
