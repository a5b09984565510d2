"""Writing safetensors files: streamed tensor by tensor, hashed as written, renamed into place at the end.

:class:`StreamingWriter` writes the header first (from a layout known in advance), then each
tensor as it is produced, so a writer holds one tensor at a time. :func:`write_safetensors`
is the same writer over a mapping; both follow the one ordering rule of :mod:`.fileformat`,
so the same tensors give the same bytes whichever way they are written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ..errors import InvalidAdapter
from .fileformat import NAMES, Entry, canonical_key, check_canonical, dtype_name, encode_header

#: one tensor of a layout as callers give it: (name, dtype, shape)
LayoutItem = tuple[str, "torch.dtype | str", Sequence[int]]


def layout_key(item: LayoutItem) -> tuple[int, str]:
    """Sort key that puts a layout in the order files are written (``sorted(layout, key=layout_key)``)."""
    return canonical_key(item[0], dtype_name(item[1]))


#: pieces at least this large are hashed beside the write (smaller ones: the thread hop costs more)
_OVERLAP_BYTES = 1 << 20


class AtomicFile:
    """A file written to a temporary name next to ``path``, hashed as written, renamed into place on commit."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0
        # Large pieces are hashed on a second thread while the next one is written: both release the
        # GIL, so hashing (0.4 s per GB here) hides behind the disk instead of adding to it.
        self._hasher: ThreadPoolExecutor | None = None
        self._hashing: Future[None] | None = None

    def write(self, data: Any) -> None:
        size = memoryview(data).nbytes
        if size < _OVERLAP_BYTES:
            self._wait()
            self._digest.update(data)
        else:
            self._wait()  # hash in file order: the previous piece first
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="chorus-hash")
            self._hashing = self._hasher.submit(self._digest.update, data)  # keeps ``data`` alive until hashed
        self._file.write(data)
        self.size += size

    def _wait(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def _stop(self) -> None:
        try:
            self._wait()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
                self._hasher = None

    def commit(self) -> str:
        """Rename into place; return the sha256 hex of everything written."""
        try:
            self._stop()
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        try:
            self._stop()
        finally:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def _entries(layout: Sequence[LayoutItem]) -> list[Entry]:
    out: list[Entry] = []
    for item in layout:
        name, dtype, shape = item
        dims = tuple(shape)
        if not isinstance(name, str) or not all(type(d) is int and d >= 0 for d in dims):
            raise InvalidAdapter(f"layout entry {item!r} must be (name, dtype, shape of non-negative ints)")
        out.append((name, dtype_name(dtype), dims))
    return out


class StreamingWriter:
    """A safetensors file whose header (from ``layout``) is written first, then each tensor in layout order.

    ``layout`` is a sequence of ``(name, dtype, shape)`` in the order files are written (widest
    dtype first, then by name: see :func:`layout_key`). :meth:`write` refuses any tensor other
    than the next one the layout names; :meth:`close` returns the sha256 and renames the file
    into place. Leaving a ``with`` block by an exception, or :meth:`abort`, leaves nothing behind.
    """

    def __init__(
        self, path: str | os.PathLike[str], layout: Sequence[LayoutItem], metadata: Mapping[str, str] | None = None
    ):
        self._layout = _entries(layout)
        check_canonical(self._layout, f"layout of {Path(path).name}")
        header = encode_header(self._layout, metadata or {})
        self._file: AtomicFile | None = AtomicFile(path)
        self._next = 0
        self.sha256: str | None = None
        try:
            self._file.write(header)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout (same name, dtype and shape, any strides, any device)."""
        if self._file is None:
            raise InvalidAdapter(f"cannot write tensor {name!r}: the file is already closed")
        if self._next >= len(self._layout):
            raise InvalidAdapter(f"cannot write tensor {name!r}: every tensor of the layout is written")
        want, dtype, shape = self._layout[self._next]
        got = NAMES.get(tensor.dtype)
        if name != want or got != dtype or tuple(tensor.shape) != shape:
            raise InvalidAdapter(
                f"expected tensor {want!r} {dtype} {list(shape)} next, got {name!r} {got or tensor.dtype} "
                f"{list(tensor.shape)}; tensors are written in layout order"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data)
        self._next += 1

    def close(self) -> str:
        """Finish the file (every tensor must be written) and return its sha256 hex."""
        if self.sha256 is not None:
            return self.sha256
        if self._file is None:
            raise InvalidAdapter("the file was aborted")
        if self._next != len(self._layout):
            missing = self._layout[self._next][0]
            self.abort()
            raise InvalidAdapter(f"closed after {self._next} of {len(self._layout)} tensors; {missing!r} is missing")
        self.sha256 = self._file.commit()
        self._file = None
        return self.sha256

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write ``tensors`` as safetensors with byte-identical output for identical input; return sha256 hex.

    The safetensors library orders ``__metadata__`` by a randomly seeded hash map, so two
    runs differ; we serialise ourselves (sorted JSON, widest dtype first so every tensor
    stays aligned) and write atomically (temp file + rename).
    """
    layout: list[LayoutItem] = []
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise InvalidAdapter(
                f"cannot write tensor {name!r} of dtype {t.dtype}; use one of {', '.join(NAMES.values())}"
            )
        layout.append((name, t.dtype, tuple(t.shape)))
    layout.sort(key=layout_key)
    with StreamingWriter(path, layout, metadata) as writer:
        for name, _, _ in layout:
            writer.write(name, tensors[name])
        return writer.close()
