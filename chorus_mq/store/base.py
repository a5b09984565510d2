"""The store interface, key validation and the download/verify logic both backends share."""

from __future__ import annotations

import abc
import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from ..errors import ChecksumMismatch, ConfigError, ObjectMissing, StoreError, TooLarge

CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Control characters would make keys ambiguous in logs and some S3 tools.
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class InvalidKey(ConfigError, ValueError):
    """An object key that could escape the store's prefix or is otherwise unsafe."""

    code = "invalid_key"


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative key; raise :class:`InvalidKey` otherwise.

    Segments may not be empty, ``.``/``..`` or start with ``.`` (the file backend keeps
    its temp files there). With ``prefix=True`` the empty string and a trailing ``/``
    are allowed, for listing.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a string, got {type(key).__name__}")
    body = key
    if prefix:
        if key == "":
            return key
        body = key[:-1] if key.endswith("/") else key
    problem = None
    if body == "":
        problem = "it is empty"
    elif body.startswith("/"):
        problem = "it starts with '/'"
    elif _BAD_CHARS.search(body):
        problem = "it contains a backslash, NUL or control character"
    elif any(seg == "" for seg in body.split("/")):
        problem = "it has an empty segment ('//' or a trailing '/')"
    elif any(seg.startswith(".") for seg in body.split("/")):
        problem = "a segment starts with '.' ('.', '..' and hidden names are reserved)"
    if problem:
        raise InvalidKey(f"invalid object key {key!r}: {problem}")
    return key


@dataclass(frozen=True)
class Head:
    """What a backend knows about an object before reading it."""

    size: int
    #: opaque version tag (S3 ETag); lets a backend read exactly the object it sized
    etag: str | None = None


class Store(abc.ABC):
    """Object storage under one prefix. Keys are relative, ``/``-separated.

    Backends implement the underscored primitives on already-validated keys; every
    public method validates keys first, and the size/hash checks live here only.
    """

    # -- primitives ---------------------------------------------------------------
    @abc.abstractmethod
    def _head(self, key: str) -> Head | None: ...

    @abc.abstractmethod
    def _chunks(self, key: str, head: Head) -> Iterator[bytes]:
        """Yield the object's bytes; raise ObjectMissing if it vanished."""

    @abc.abstractmethod
    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None: ...

    @abc.abstractmethod
    def _range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) with end > start, clipped to the object; b"" past its end."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterable[str]: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """A URL naming ``key``, for messages and display (not a download link)."""

    # -- public API -----------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, write_once: bool = True) -> None:
        """Store ``data``; with ``write_once`` raise ObjectExists if ``key`` exists."""
        self._put(check_key(key), io.BytesIO(data), len(data), write_once)

    def put_file(self, key: str, path: str | os.PathLike, *, write_once: bool = True) -> None:
        """Stream the local file ``path`` to ``key``; write-once as in :meth:`put_bytes`."""
        check_key(key)
        try:
            src = open(path, "rb")
        except OSError as exc:
            raise ConfigError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from exc
        with src:
            self._put(key, src, os.fstat(src.fileno()).st_size, write_once)

    def get_bytes(self, key: str) -> bytes:
        """The whole object. Prefer :meth:`download` for anything large."""
        head = self._require(check_key(key))
        data = b"".join(self._chunks(key, head))
        _check_count(self.url_for(key), len(data), head.size)
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` like ``data[start:end]``: clipped to the object's size."""
        check_key(key)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"need 0 <= start <= end, got start={start!r} end={end!r}")
        if start == end:
            # An empty range is not expressible as an HTTP Range; still report a missing key.
            self._require(key)
            return b""
        return self._range(key, start, end)

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
        dest_path: str | os.PathLike,
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
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.lower()
            if not _SHA256.match(expected_sha256):
                raise ValueError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
        head = self._require(key)
        url = self.url_for(key)
        if max_bytes is not None and head.size > max_bytes:
            raise TooLarge(f"{url} is {head.size} bytes, over the limit of {max_bytes}")
        dest = os.path.abspath(os.fspath(dest_path))
        # Never read past the advertised size: a replaced object can't overrun the limit.
        tmp, digest, count = write_temp(os.path.dirname(dest), self._chunks(key, head), head.size + 1)
        try:
            # Size before hash: a truncated transfer is transient, not a bad delta.
            _check_count(url, count, head.size)
            if expected_sha256 is not None and digest != expected_sha256:
                raise ChecksumMismatch(
                    f"{url}: sha256 is {digest}, expected {expected_sha256}; the object "
                    "is not the one that was announced"
                )
            os.replace(tmp, dest)
        except BaseException:
            _unlink(tmp)
            raise
        return digest

    def _require(self, key: str) -> Head:
        head = self._head(key)
        if head is None:
            raise ObjectMissing(f"object {self.url_for(key)} does not exist")
        return head


def write_temp(directory: str, chunks: Iterable[bytes], limit: int | None = None) -> tuple[str, str, int]:
    """Write ``chunks`` to a fsynced temp file in ``directory``.

    Returns ``(temp_path, sha256_hex, byte_count)``; stops reading after ``limit`` bytes.
    The caller renames or links the temp file into place, or unlinks it.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".chorus-", suffix=".part")
    except OSError as exc:
        raise StoreError(f"cannot write in {directory}: {exc.strerror or exc}") from exc
    sha = hashlib.sha256()
    count = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                sha.update(chunk)
                count += len(chunk)
                out.write(chunk)
                if limit is not None and count >= limit:
                    break
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        _unlink(tmp)
        raise StoreError(f"cannot write {tmp}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink(tmp)
        raise
    return tmp, sha.hexdigest(), count


def read_chunks(src: BinaryIO, size: int | None = None) -> Iterator[bytes]:
    """Yield ``src`` in CHUNK-sized pieces, at most ``size`` bytes in all."""
    left = size
    while left is None or left > 0:
        chunk = src.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _check_count(url: str, count: int, size: int) -> None:
    if count != size:
        raise StoreError(
            f"read {count} bytes of {url} but it has {size}: the transfer was cut short "
            "or the object was replaced meanwhile; retry"
        )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
