"""A shard's SCAFFOLD server variate: read the previous global and variate, write this round's variate.

The variate of round r is a safetensors object per shard next to the adapter (same keys, shapes
and order), so a client pulls it with the round. Its inputs are immutable round objects: the
previous complete round's adapter and variate (listed, with their hashes, in its manifest), the
accepted deltas, the plan's weights and fraction, and each delta record's signed ``lr_sum``; a
rerun writes the same bytes. Why the shard computes each client's Δc_i from its uploaded factors
and one declared number (rather than the client uploading Δc_i): the worker already holds x, c and
y_i, so no extra tensors cross the trust boundary (no new ingest surface, no doubled upload), and a
client cannot send a variate inconsistent with the update it is aggregated with.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import StreamingWriter
from ..aggregation.robust import RELATIVE_CLIP
from ..aggregation.variates import gauge_rotation, next_variate, transport
from ..errors import AggregationError
from ..layout import shard_key
from ..manifest import Manifest, ObjectRef
from ..names import VARIATE_FORMAT, RoundStatus
from ..results import fetch_manifest
from ..state import FederationConfig
from .round_plan import Plan
from .runtime import Runtime

log = logging.getLogger(__name__)

_F32 = torch.float32


def previous_complete(rt: Runtime, federation: str, r: int) -> int | None:
    """The latest complete round before ``r``: the one every client of round ``r`` started from."""
    for j in range(r - 1, -1, -1):
        if rt.state.round(federation, j).state == RoundStatus.COMPLETE:
            return j
    return None


class _Tensors:
    """Named tensors of a round's shard objects (verified local copies), read one at a time."""

    def __init__(self, stack: contextlib.ExitStack, rt: Runtime, refs: Sequence[ObjectRef]):
        from safetensors import safe_open

        self._handles: list[Any] = []
        for ref in refs:
            local = stack.enter_context(
                rt.store.local_copy(ref.key, expected_sha256=ref.sha256, max_bytes=ref.size, spool_dir=rt.spool)
            )
            self._handles.append(stack.enter_context(safe_open(str(Path(local.path)), "pt")))
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118 (not a mapping)

    def get(self, key: str) -> torch.Tensor | None:
        handle = self._where.get(key)
        return None if handle is None else handle.get_tensor(key)


class ShardVariates:
    """Round ``r``'s server variate for shard ``k``'s items, streamed in the adapter's layout."""

    def __init__(
        self,
        rt: Runtime,
        federation: str,
        r: int,
        k: int,
        plan: Plan,
        config: FederationConfig,
        stack: contextlib.ExitStack,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    ):
        start = previous_complete(rt, federation, r)
        if start is None:
            raise AggregationError(f"round {r} has no complete round before it: SCAFFOLD needs the start (round 0)")
        previous, _sha = fetch_manifest(rt.state, rt.store, federation, start)
        items = plan.shard_items(k)
        shards = [s for s in previous.shards if s.first <= items[-1] and s.last >= items[0]]
        self.start = _Tensors(stack, rt, [s.adapter for s in shards])
        self.server = _Tensors(stack, rt, [s.variate for s in shards if s.variate is not None])
        self.plan = plan
        self.k = config.relative_clip or RELATIVE_CLIP  # the variate is always bounded: lr_sum is the client's word
        records = rt.state.deltas(federation, r)
        self.lr_sums: dict[str, float] = {}
        for client in plan.clients:
            lr_sum = records[client].lr_sum
            if lr_sum is None:
                raise AggregationError(f"client {client!r}'s delta declares no lr_sum in a SCAFFOLD round")
            self.lr_sums[client] = lr_sum
        self.clipped: dict[str, float] = {}
        self.round, self.previous_round = r, start
        out = stack.enter_context(rt.store.writer(lambda sha: shard_key(federation, r, k, "variate", sha)))
        out.file.close()  # written through its path by the streaming writer
        self._out = out
        self._file = stack.enter_context(StreamingWriter(out.path, layout, {"format": VARIATE_FORMAT}))

    def add(self, name: str, extra: bool, holders: Sequence[str], raw: Sequence[Any], result: Any) -> None:
        """Write item ``name``'s variate: ``raw`` are the holders' uploaded tensors (an extra) or updates (a
        module), ``result`` the published ModuleResult or tensor."""
        keys = [name] if extra else [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
        start = [self.start.get(key) for key in keys]
        if any(t is None for t in start):
            # the previous global lacks the item (nobody trained it then): no start, no variate yet
            for key, shape in zip(keys, _shapes(extra, result), strict=True):
                self._file.write(key, torch.zeros(shape, dtype=_F32))
            return
        server_parts = [self.server.get(key) for key in keys]
        server = None if any(t is None for t in server_parts) else server_parts
        trained = [[t] for t in raw] if extra else [[u.A, u.B] for u in raw]
        total, factors = next_variate(
            server,  # type: ignore[arg-type]
            start,  # type: ignore[arg-type]
            trained,
            [self.lr_sums[c] for c in holders],
            [self.plan.weights[c] for c in holders],
            fraction=self.plan.variate_fraction,
            k=self.k,
        )
        for client, factor in zip(holders, factors, strict=True):
            if factor < 1.0:
                self.clipped[f"{client}|{name}"] = factor
        if not extra:
            # into the basis the round's adapter is published in (the start of the next round)
            rotation = gauge_rotation(result.A.to(_F32), start[0])  # type: ignore[arg-type]
            total = list(transport(total[0], total[1], rotation))
        for key, tensor in zip(keys, total, strict=True):
            self._file.write(key, tensor.to(_F32))

    def finish(self) -> None:
        """Finish the file (inside the shard's stack: the store then keeps it under its hash)."""
        self._out.trusted_sha256 = self._file.close()  # hashed as written: the store need not read it again

    @property
    def ref(self) -> ObjectRef:
        """The stored object (once the shard's stack has closed)."""
        written = self._out.result
        return ObjectRef(key=written.key, sha256=written.sha256, size=written.size)


def _shapes(extra: bool, result: Any) -> list[tuple[int, ...]]:
    if extra:
        return [tuple(result.shape)]
    return [tuple(result.A.shape), tuple(result.B.shape)]


def variate_refs(manifest: Manifest) -> list[ObjectRef]:
    """A round's variate objects in shard order (empty when the round has none)."""
    return [s.variate for s in manifest.shards if s.variate is not None]
