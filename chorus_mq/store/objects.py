"""What the store hands back: object heads, verified local files, and streamed write-once outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .spool import unlink


@dataclass(frozen=True)
class Head:
    """What a backend knows about an object before reading it."""

    size: int
    #: opaque version tag (S3: the ETag; file: device, inode, size and mtime); lets a backend read
    #: or copy exactly the object it sized
    etag: str | None = None


@dataclass(frozen=True)
class WrittenObject:
    """Where a streamed output ended up."""

    key: str
    sha256: str
    size: int
    #: an identical object was already there (content addressing: a rerun or a concurrent writer)
    existed: bool = False


class LocalObject:
    """An object as a local file whose size and sha256 were checked; use it as a context manager.

    ``path`` is the store's own file (``file://``: nothing copied; do not modify it) or a spooled
    download (``s3://``), which :meth:`close` deletes.
    """

    def __init__(self, path: str, *, sha256: str, size: int, etag: str | None, owned: bool, fd: int | None = None):
        self.path = Path(path)
        self.sha256 = sha256
        self.size = size
        #: the version that was verified: pass it to :meth:`Store.copy` as ``if_etag`` to copy exactly it
        self.etag = etag
        #: whether ``path`` is a spooled copy that :meth:`close` removes
        self.owned = owned
        # Held open so the verified inode stays the one the path names while we use it.
        self._fd = fd

    def close(self) -> None:
        """Release the file (and delete it if it was spooled); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.owned:
            unlink(str(self.path))
            self.owned = False

    def __enter__(self) -> LocalObject:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalObject({str(self.path)!r}, sha256={self.sha256[:12]}..., size={self.size})"


class ObjectWriter:
    """A local file to write one output into; the store names and places it when the block ends.

    Write through :attr:`file`, or close nothing and let another writer open :attr:`path` (the
    store hashes whatever the file holds at the end). :attr:`result` is set on a clean exit.
    """

    def __init__(self, fd: int, path: str):
        self._file: BinaryIO = os.fdopen(fd, "wb")
        #: the local file being written (inside the store's directory for ``file://``)
        self.path = Path(path)
        #: optional: the digest the caller computed while writing (e.g. ``StreamingWriter.close()``);
        #: the store still hashes the file and refuses to store it if the two differ
        self.sha256: str | None = None
        #: optional: a digest of every byte written, computed by this process while writing; the store
        #: trusts it and does not read the file again
        self.trusted_sha256: str | None = None
        self._result: WrittenObject | None = None

    @property
    def file(self) -> BinaryIO:
        """The open binary file, positioned at the start."""
        return self._file

    @property
    def result(self) -> WrittenObject:
        """Key, sha256 and size of the stored object; only after the ``with`` block ended cleanly."""
        if self._result is None:
            raise RuntimeError("the object is stored (and named) only when the writer's with-block ends")
        return self._result

    def _finish_file(self, *, durable: bool) -> None:
        if not self._file.closed:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
            self._file.close()
        elif durable:
            # Written through the path by someone else: make those bytes durable too.
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
