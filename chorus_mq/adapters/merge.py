"""Merging safetensors files whose tensors are disjoint and already in order: a round's shards into one file.

Each source arrives as its header bytes (a ranged read of its first ``8 + n`` bytes) and an
iterator over its data region. Every source's sha256 is checked over exactly those bytes while
they stream through, the merged header is written first, and no more than one chunk is held.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ..errors import ChecksumMismatch, InvalidAdapter
from .fileformat import Entry, check_canonical, encode_header
from .header import DEFAULT_MAX_HEADER_BYTES, Header, header_from_prefix, in_file_order
from .writer import AtomicFile


class MergeSource(NamedTuple):
    """One file to merge: its first ``8 + n`` bytes, its data region in chunks, and its expected sha256."""

    header: bytes
    chunks: Iterable[Any]  # bytes-like
    sha256: str


def merge_safetensors(
    sources: Sequence[MergeSource | tuple[bytes, Iterable[Any], str]],
    out_path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> str:
    """Write the concatenation of ``sources`` as one safetensors file; return its sha256 hex.

    The sources' tensors, taken in order, must be disjoint and in the order every file is
    written (widest dtype first, then by name), so the result is byte for byte what
    ``write_safetensors`` writes for all of them with ``metadata``. Raises ChecksumMismatch
    when a source's bytes do not hash to its sha256 and InvalidAdapter when they do not
    match its header; the output file is then not created (or left as it was).
    """
    headers = [header_from_prefix(bytes(src[0]), max_header_bytes=max_header_bytes) for src in sources]
    entries: list[Entry] = [(name, info.dtype, info.shape) for h in headers for name, info in in_file_order(h)]
    seen: set[str] = set()
    for name, _, _ in entries:
        if name in seen:
            raise InvalidAdapter(f"tensor {name!r} is in more than one of the files to merge")
        seen.add(name)
    check_canonical(entries, "merged file")
    out = AtomicFile(out_path)
    try:
        out.write(encode_header(entries, metadata or {}))
        for i, (src, header) in enumerate(zip(sources, headers, strict=True)):
            _copy(i, MergeSource(*src), header, out)
    except BaseException:
        out.abort()
        raise
    return out.commit()


def _copy(i: int, src: MergeSource, header: Header, out: AtomicFile) -> None:
    digest = hashlib.sha256(src.header)
    left = header.data_len
    for chunk in src.chunks:
        n = memoryview(chunk).nbytes
        if n > left:
            raise InvalidAdapter(f"source {i} has more data than the {header.data_len} bytes its header describes")
        digest.update(chunk)
        out.write(chunk)
        left -= n
    if left:
        raise InvalidAdapter(f"source {i} ended {left} bytes short of the {header.data_len} its header describes")
    if digest.hexdigest() != src.sha256:
        raise ChecksumMismatch(f"source {i} has sha256 {digest.hexdigest()}, expected {src.sha256}")
