"""``file:///path``: a local directory, for development, tests and single-host setups."""

from __future__ import annotations

import contextlib
import os
import stat
from typing import BinaryIO, Iterable, Iterator

from ..errors import ChorusError, ObjectExists, ObjectMissing, StoreError
from .base import Head, Store, _unlink, read_chunks, write_temp


class FileStore(Store):
    """Objects as files under ``root``. Write-once is a hard link of a complete temp file."""

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
                st = os.stat(self._path(key))
        except ObjectMissing:
            return None
        # A directory is only a common prefix of other keys, as on S3.
        return Head(size=st.st_size) if stat.S_ISREG(st.st_mode) else None

    def _chunks(self, key: str, head: Head) -> Iterator[bytes]:
        with self._errors(key, "read"), open(self._path(key), "rb") as f:
            yield from read_chunks(f)

    def _range(self, key: str, start: int, end: int) -> bytes:
        with self._errors(key, "read"), open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None:
        final = self._path(key)
        directory = os.path.dirname(final)
        # Readers must never see a partial object: write and fsync a temp file, then
        # link it into place. link() fails if the name exists, atomically.
        tmp, _, _ = write_temp(directory, read_chunks(src, size))
        try:
            with self._errors(key, "write", write=True):
                if write_once:
                    os.link(tmp, final)
                else:
                    os.replace(tmp, final)
                _fsync_dir(directory)
        finally:
            _unlink(tmp)

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

    @contextlib.contextmanager
    def _errors(self, key: str, op: str, *, write: bool = False):
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


def _fsync_dir(path: str) -> None:
    # The new name is durable only once its directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _walk_error(exc: OSError) -> None:
    if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        raise StoreError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc
