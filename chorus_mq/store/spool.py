"""Local file plumbing both backends share: temp files, chunked reads, hashing by file descriptor."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from ..errors import StoreError

CHUNK = 1024 * 1024
#: temp files start with this; keys may not start a segment with "." so they never collide or list
TEMP_PREFIX = ".chorus-"
#: what objects of the file backend are once in place: nobody rewrites a write-once object by accident
READ_ONLY = 0o444


def make_temp(directory: str, suffix: str = ".part") -> tuple[int, str]:
    """Create an empty temp file in ``directory`` (made if missing); return ``(fd, path)``."""
    try:
        os.makedirs(directory, exist_ok=True)
        return tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=suffix)
    except OSError as exc:
        raise StoreError(f"cannot write in {directory}: {exc.strerror or exc}") from exc


def write_temp(
    directory: str, chunks: Iterable[bytes], limit: int | None = None, *, suffix: str = ".part"
) -> tuple[str, str, int]:
    """Write ``chunks`` to a fsynced temp file in ``directory``.

    Returns ``(temp_path, sha256_hex, byte_count)``; stops reading after ``limit`` bytes.
    The caller renames or links the temp file into place, or unlinks it.
    """
    fd, tmp = make_temp(directory, suffix)
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
        unlink(tmp)
        raise StoreError(f"cannot write {tmp}: {exc.strerror or exc}") from exc
    except BaseException:
        unlink(tmp)
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


def pread_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of ``fd`` by offset (no shared file position); stop early at EOF."""
    offset = start
    while offset < end:
        chunk = os.pread(fd, min(CHUNK, end - offset), offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk


def pread_all(fd: int, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``fd`` in one buffer, clipped at EOF (``pread`` may return less than asked)."""
    first = os.pread(fd, end - start, start)
    if len(first) in (0, end - start):
        return first
    return first + b"".join(pread_chunks(fd, start + len(first), end))


def hash_fd(fd: int, limit: int) -> tuple[str, int]:
    """sha256 of ``fd`` from offset 0, reading at most ``limit`` bytes into one reused buffer."""
    sha = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    count = 0
    while count < limit:
        n = os.preadv(fd, [view[: min(CHUNK, limit - count)]], count)
        if n == 0:
            break
        sha.update(view[:n])
        count += n
    return sha.hexdigest(), count


def fsync_dir(path: str) -> None:
    """Make a new directory entry durable (a linked or renamed name is durable only then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
