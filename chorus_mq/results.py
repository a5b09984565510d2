"""Round result objects as files: merging a round's shard objects, summing residual files.

Shared by the workers (compaction) and the clients (pull). Objects are streamed and checked
against the hashes their manifest lists; sums are exact (concatenated factors while that is
smaller than dense, else a float64 dense sum stored fp32) and written module by module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ChecksumMismatch, NotFound
from .manifest import Manifest, ObjectRef
from .names import RESIDUAL_FORMAT, RoundStatus
from .state import RoundState
from .store import Store


def fetch_manifest(state: RoundState, store: Store, federation: str, r: int) -> tuple[Manifest, str]:
    """Round ``r``'s manifest, checked against the hash Redis recorded when the round committed."""
    info = state.round(federation, r)
    if info.state != RoundStatus.COMPLETE or not info.manifest:
        raise NotFound(
            f"round {r} of {federation!r} is {info.state}, not complete; the latest complete round is "
            f"{state.latest_complete(federation)}"
        )
    raw = store.get_bytes(info.manifest)
    sha = hashlib.sha256(raw).hexdigest()
    if not info.manifest_sha256 or sha != info.manifest_sha256:
        raise ChecksumMismatch(
            f"manifest of round {r} ({info.manifest}) has sha256 {sha}, but "
            f"{info.manifest_sha256 or 'nothing'} was recorded at commit: refusing it"
        )
    return Manifest.from_json(raw), sha


def complete_rounds(state: RoundState, federation: str, after: int, upto: int) -> list[int]:
    """The complete rounds in ``(after, upto]``, oldest first: the increments a correction needs."""
    return [
        info.round
        for info in state.rounds(federation)
        if after < info.round <= upto and info.state == RoundStatus.COMPLETE
    ]


def merge_objects(
    store: Store,
    refs: list[ObjectRef],
    path: Path,
    metadata: dict[str, str],
    progress: Callable[[int], object] | None = None,
    *,
    reuse: Callable[[str, int], bytes | None] | None = None,
) -> bool:
    """Stream the objects' tensors into one safetensors file at ``path``, each object checked against its
    hash; returns False (and writes nothing) when there are none. ``progress`` gets each chunk's size.

    ``reuse(name, nbytes)`` may give a tensor's bytes from a local copy instead of the store (a pulled
    directory's unchanged frozen factor): the object's hash is still checked over every byte, so a wrong
    local copy raises ChecksumMismatch and ``path`` is left as it was."""
    from .adapters import merge_safetensors
    from .adapters.header import DEFAULT_MAX_HEADER_BYTES, header_from_prefix, in_file_order

    if not refs:
        return False
    sources = []
    for ref in refs:
        head = store.get_range(ref.key, 0, 8)
        n = int.from_bytes(head, "little")
        if n > ref.size - 8:
            raise ChecksumMismatch(f"{ref.key}: header length {n} does not fit its {ref.size} bytes")
        header = head + store.get_range(ref.key, 8, 8 + n)
        if reuse is None:
            chunks = _chunks(store, ref.key, 8 + n, ref.size, progress)
        else:
            order = in_file_order(header_from_prefix(header, max_header_bytes=DEFAULT_MAX_HEADER_BYTES))
            spans = [(name, 8 + n + info.begin, 8 + n + info.end) for name, info in order]
            chunks = _reusing(store, ref.key, spans, 8 + n, ref.size, reuse, progress)
        sources.append((header, chunks, ref.sha256))
    merge_safetensors(sources, path, metadata)
    return True


def _reusing(
    store: Store,
    key: str,
    spans: list[tuple[str, int, int]],
    start: int,
    end: int,
    reuse: Callable[[str, int], bytes | None],
    progress: Callable[[int], object] | None,
) -> Iterator[bytes]:
    """The data region of ``key``: each tensor from ``reuse`` when it has it, else fetched (with any gap)."""
    at = start
    pending = start  # fetch [pending, at) in one ranged read before the next reused tensor
    for name, begin, stop in spans:
        local = reuse(name, stop - begin) if begin == at else None
        if local is not None and len(local) == stop - begin:
            if pending < at:
                yield from _chunks(store, key, pending, at, progress)
            yield local
            pending = stop
        at = stop
    if pending < end:
        yield from _chunks(store, key, pending, end, progress)


def _chunks(store: Store, key: str, start: int, end: int, progress: Callable[[int], object] | None) -> Iterator[bytes]:
    for chunk in store.stream(key, start, end):
        if progress is not None:
            progress(len(chunk))
        yield chunk


def write_empty_residual(path: Path) -> None:
    from .adapters import write_residual

    write_residual(path, {})


def sum_residual_files(parts: list[Path], out: Path, *, dtype: str = "float32") -> str:
    """``out`` = the sum of the residual files ``parts``, module by module (exact: concatenated factors while
    smaller than dense, else a float64 dense sum), stored as ``dtype`` (float32, or bfloat16 for compact
    snapshots: about 3 significant digits); ``out`` has no module for an empty list. Returns its sha256."""
    from .adapters import ResidualReader, StreamingWriter
    from .aggregation import sum_layout, sum_residuals

    readers = [ResidualReader(p, check_values=False) for p in parts]  # verified by hash
    try:
        modules = sorted({m for r in readers for m in r.modules})
        import torch

        store_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        layout: list[tuple[str, Any, tuple[int, ...]]] = []

        for m in modules:
            holders = [r for r in readers if m in r.modules]
            d_out, d_in = holders[0].shape(m)
            form, rank = sum_layout([r.form(m) for r in holders], d_out, d_in)
            if form == "dense":
                layout.append((f"{m}.residual", store_dtype, (d_out, d_in)))
            elif form == "factored":
                layout.append((f"{m}.residual_left", store_dtype, (d_out, rank)))
                layout.append((f"{m}.residual_right", store_dtype, (rank, d_in)))
        writer = StreamingWriter(out, layout, {"format": RESIDUAL_FORMAT})
        for m in modules:
            total = sum_residuals([r.get(m) for r in readers if m in r.modules])
            if total is None:
                continue
            if total.dense is not None:
                writer.write(f"{m}.residual", total.dense.to(store_dtype))
            else:
                assert total.left is not None and total.right is not None
                writer.write(f"{m}.residual_left", total.left.to(store_dtype))
                writer.write(f"{m}.residual_right", total.right.to(store_dtype))
        return writer.close()
    finally:
        for r in readers:
            r.close()
