"""Reading a round's accepted deltas module by module: ranged reads, every byte checked.

Each accepted delta has an index the ingest worker wrote (spans, per-module sha256, resolved
scaling); its own sha256 is in the delta record in Redis. A reader fetches only the byte
ranges of the modules it needs (``pread`` on a file:// store, ranged GETs on S3) and checks
each module's digest before any tensor is built, so no task re-reads or re-hashes whole files.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..adapters import DeltaIndex, extra_from_bytes, module_from_bytes, tensors_from_bytes
from ..aggregation import ClientUpdate
from ..errors import AggregationError, ChecksumMismatch
from ..manifest import ObjectRef
from ..names import Factor
from ..state.rounds import DeltaRecord
from .runtime import Runtime

_INDEX_CACHE: OrderedDict[str, DeltaIndex] = OrderedDict()
_INDEX_CACHE_SIZE = 256
_lock = threading.Lock()


def load_index(rt: Runtime, record: DeltaRecord) -> DeltaIndex:
    """The delta's index, checked against the hash in its record (cached per process by that hash)."""
    with _lock:
        cached = _INDEX_CACHE.get(record.index_sha256)
        if cached is not None:
            _INDEX_CACHE.move_to_end(record.index_sha256)
            return cached
    raw = rt.store.get_bytes(record.index_key)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != record.index_sha256:
        raise ChecksumMismatch(
            f"index {record.index_key} has sha256 {digest}, but {record.index_sha256} was "
            "recorded when the delta was accepted"
        )
    index = DeltaIndex.from_json(raw)
    with _lock:
        _INDEX_CACHE[record.index_sha256] = index
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return index


class RoundInputs:
    """The accepted deltas of a round's kept clients, read by module."""

    def __init__(self, rt: Runtime, records: Mapping[str, DeltaRecord]):
        self.rt = rt
        self.records = dict(records)
        self.indexes = {client: load_index(rt, rec) for client, rec in self.records.items()}
        self.bytes_read = 0
        #: a published lora_A's float32 bytes -> the sha256 state after them (a module's digest hashes A first), so
        #: every holder's check hashes only its own B (keyed by the bytes themselves: equal bytes, equal state)
        self._prefixes: dict[bytes, Any] = {}

    def holders(self, module: str) -> list[str]:
        """Clients (in record order) whose delta carries ``module``."""
        return [c for c, idx in self.indexes.items() if module in idx.modules]

    def factors(self, client: str, module: str) -> tuple[Tensor, Tensor]:
        entry = self.indexes[client].modules[module]
        key = self.records[client].key
        a, b = entry.a, entry.b
        if a == b:  # Fed-SB: lora_R stands as both factors
            raw_a = raw_b = self.rt.store.get_range(key, a.begin, a.end)
        elif a.end == b.begin:  # one read for the pair (the normal layout of a delta)
            raw = self.rt.store.get_range(key, a.begin, b.end)
            raw_a, raw_b = raw[: a.end - a.begin], raw[a.end - a.begin :]
        else:
            raw_a = self.rt.store.get_range(key, a.begin, a.end)
            raw_b = self.rt.store.get_range(key, b.begin, b.end)
        self.bytes_read += len(raw_a) + (len(raw_b) if a != b else 0)
        return module_from_bytes(entry, raw_a, raw_b)

    def update(self, client: str, module: str, weight: float) -> ClientUpdate:
        A, B = self.factors(client, module)
        scaling = self.indexes[client].modules[module].scaling
        return ClientUpdate(A=A, B=B, scaling=scaling, weight=weight)

    def trained_update(
        self, client: str, module: str, weight: float, frozen: Factor, published: Tensor, raw: bytes
    ) -> ClientUpdate:
        """A linear strategy's update read without its frozen factor: only the trained factor's bytes are fetched,
        and the module's digest (A's bytes then B's) is checked with ``raw``, the ``published`` frozen factor's
        float32 bytes, in its place. Ingest accepted only uploads whose frozen factor is those very bytes, so a
        match proves the stored module is the accepted one and its frozen factor the published tensor."""
        entry = self.indexes[client].modules[module]
        span = entry.b if frozen == Factor.LORA_A else entry.a
        other = entry.a if frozen == Factor.LORA_A else entry.b
        if other.dtype != "F32" or other.nbytes != len(raw) or other.shape != tuple(published.shape):
            raise ChecksumMismatch(f"{client}'s {module} does not hold the published {frozen} (float32)")
        got = self.rt.store.get_range(self.records[client].key, span.begin, span.end)
        self.bytes_read += len(got)
        if len(got) != span.nbytes:
            raise ChecksumMismatch(f"{client}'s {module}: {len(got)} bytes of its trained factor, not {span.nbytes}")
        if frozen == Factor.LORA_A:
            pair = self._prefix(raw).copy()
            pair.update(got)
        else:
            pair = hashlib.sha256(got)
            pair.update(raw)
        if pair.hexdigest() != entry.sha256:
            raise ChecksumMismatch(
                f"{client}'s {module}: the module hashes to {pair.hexdigest()} with the published {frozen}, but "
                f"{entry.sha256} was indexed at ingest"
            )
        trained = tensors_from_bytes(span, got)
        A, B = (published, trained) if frozen == Factor.LORA_A else (trained, published)
        return ClientUpdate(A=A, B=B, scaling=entry.scaling, weight=weight)

    def _prefix(self, raw: bytes) -> Any:
        """The sha256 state after ``raw`` (hashed once per published factor, copied for each holder)."""
        state = self._prefixes.get(raw)
        if state is None:
            state = self._prefixes[raw] = hashlib.sha256(raw)
        return state

    def extra(self, client: str, key: str) -> Tensor:
        entry = self.indexes[client].extras[key]
        raw = self.rt.store.get_range(self.records[client].key, entry.span.begin, entry.span.end)
        self.bytes_read += len(raw)
        return extra_from_bytes(entry, raw)


_HEAD_CACHE: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
_HEAD_CACHE_SIZE = 8


def carried_heads(rt: Runtime, refs: Sequence[ObjectRef], names: Collection[str]) -> dict[str, Tensor]:
    """The tensors ``names`` (a task head) from the adapter objects ``refs`` of an earlier round, each object
    checked against its manifest's sha256 (``--personal-heads``: every round publishes round 0's head)."""
    from safetensors.torch import load as load_safetensors

    found: dict[str, Tensor] = {}
    for ref in refs:
        with _lock:
            cached = _HEAD_CACHE.get(ref.sha256)
        if cached is None:
            raw = rt.store.get_bytes(ref.key)
            digest = hashlib.sha256(raw).hexdigest()
            if digest != ref.sha256:
                raise ChecksumMismatch(f"{ref.key} has sha256 {digest}, but its manifest lists {ref.sha256}")
            cached = {k: v.float().contiguous() for k, v in load_safetensors(raw).items() if k in names}
            with _lock:
                _HEAD_CACHE[ref.sha256] = cached
                while len(_HEAD_CACHE) > _HEAD_CACHE_SIZE:
                    _HEAD_CACHE.popitem(last=False)
        found.update(cached)
    missing = sorted(set(names) - set(found))
    if missing:
        raise AggregationError(f"the initial adapter's objects lack the task head tensor(s) {missing}")
    return found
