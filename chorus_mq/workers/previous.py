"""What an earlier round published, read back by the workers for some of its items.

A round that steps from the previous global (a server optimiser, control variates) reads, for its
own shard's items, the published adapter of a complete round and whatever else that round's shards
wrote (the optimiser's state). Round objects are write-once and named in a manifest whose hash Redis
recorded at commit, so every read is checked and a rerun reads the same bytes. Shards hold
contiguous runs of the sorted items, so only the shards whose name range covers an item are read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..adapters import LoraSpec
from ..errors import StateCorrupt
from ..manifest import FrameRef, Manifest, ObjectRef, ShardEntry
from ..results import fetch_manifest
from ..strategy import strategy_spec
from .runtime import Runtime


@dataclass(frozen=True)
class PreviousModule:
    """One LoRA module of a published global adapter: ``scaling · B @ A`` (Fed-SB: ``scaling · B @ R @ A``)."""

    A: Tensor
    B: Tensor
    scaling: float
    #: Fed-SB: the published (r, r) matrix between the frame's B and A; None: none published
    R: Tensor | None = None


@dataclass(frozen=True)
class PreviousGlobal:
    """A complete round's published global adapter for some items (``round`` None: there was none)."""

    round: int | None
    modules: dict[str, PreviousModule] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


def previous_global(rt: Runtime, federation: str, round_: int | None, items: Iterable[str]) -> PreviousGlobal:
    """Round ``round_``'s published global for ``items`` (module names and extra tensor keys): each module's
    A, B and scaling (from the round's adapter config), each extra's tensor. An item that round did not
    publish is absent; ``round_`` None (no complete round yet, e.g. no initial adapter) gives nothing."""
    wanted = sorted(set(items))
    if round_ is None or not wanted:
        return PreviousGlobal(round_)
    manifest, _ = fetch_manifest(rt.state, rt.store, federation, round_)
    suffixes = ("", ".lora_A.weight", ".lora_B.weight", ".lora_R.weight")
    keys = {f"{item}{suffix}" for item in wanted for suffix in suffixes}
    tensors = read_part(rt, manifest, lambda s: s.adapter, wanted, keys)
    if manifest.frame is not None:  # the round stored what it trained; its frozen factors lie where last written
        frame_keys = {f"{item}.{part}.weight" for item in wanted for part in manifest.frame.factors}
        tensors.update(read_part(rt, manifest, lambda s: s.adapter, wanted, frame_keys, manifest.frame.shards))
    spec = LoraSpec.from_peft_config(manifest.adapter_config)
    out = PreviousGlobal(round_)
    for item in wanted:
        a, b = tensors.get(f"{item}.lora_A.weight"), tensors.get(f"{item}.lora_B.weight")
        if a is not None and b is not None:
            r = tensors.get(f"{item}.lora_R.weight")
            out.modules[item] = PreviousModule(a, b, spec.scaling(item, int(a.shape[0])), r)
        elif item in tensors:
            out.extras[item] = tensors[item]
    return out


def round_frame(rt: Runtime, federation: str, strategy: str, r: int, start: int | None) -> FrameRef | None:
    """Where the factors round ``r`` freezes (``StrategySpec.framed``) lie: in the objects of the round that last
    wrote them, found through ``start``, the round ``r`` started from (its own objects, or the frame it refers
    to); None for strategies that freeze nothing. ffa-lora's and Fed-SB's frame is round 0's for ever; rolora's
    frozen factor lies in the objects of the round that last trained it."""
    factors = strategy_spec(strategy).framed(r)
    if not factors:
        return None
    if start is None:
        raise StateCorrupt(f"round {r} of {federation!r} ({strategy}) has no published start for its frozen factors")
    manifest, _ = fetch_manifest(rt.state, rt.store, federation, start)
    return manifest.frame_source(factors)


def read_part(
    rt: Runtime,
    manifest: Manifest,
    part: Callable[[ShardEntry], ObjectRef | None],
    items: Collection[str],
    keys: Collection[str],
    shards: Sequence[ShardEntry] | None = None,
) -> dict[str, Tensor]:
    """The tensors named ``keys`` of the objects ``part`` picks from the shards of ``manifest`` (or ``shards``)
    that hold any of ``items``, read now."""
    with contextlib.ExitStack() as stack:
        opened = open_part(rt, manifest, part, items, keys, stack, shards)
        return {key: opened.get(key) for key in opened.names()}


class Part:
    """Named tensors of some of a round's objects, opened once and read on demand (one at a time: the
    handles are shared by the threads that aggregate a shard's modules)."""

    def __init__(self) -> None:
        self._where: dict[str, Any] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self._where)

    def add(self, key: str, handle: Any, where: str) -> None:
        if key in self._where:
            raise StateCorrupt(f"{where}: tensor {key!r} is in more than one shard")
        self._where[key] = handle

    def get(self, key: str) -> Tensor:
        with self._lock:
            tensor: Tensor = self._where[key].get_tensor(key)
        return tensor

    def find(self, key: str) -> Tensor | None:
        return self.get(key) if key in self._where else None


def open_part(
    rt: Runtime,
    manifest: Manifest,
    part: Callable[[ShardEntry], ObjectRef | None],
    items: Collection[str],
    keys: Collection[str],
    stack: contextlib.ExitStack,
    shards: Sequence[ShardEntry] | None = None,
) -> Part:
    """Open the objects ``part`` picks from the shards of ``manifest`` (or ``shards``, e.g. a Fed-SB round's frame)
    that hold any of ``items`` (each checked against its hash before a byte of it is parsed; closed with
    ``stack``) for their tensors named ``keys``."""
    from safetensors import safe_open

    out = Part()
    ordered = sorted(items)
    for shard in manifest.shards if shards is None else shards:
        ref = part(shard)
        if ref is None or not _covers(shard, ordered):
            continue
        # file:// hashes the object where it lies; s3:// spools it once
        local = stack.enter_context(
            rt.store.local_copy(ref.key, expected_sha256=ref.sha256, max_bytes=ref.size, spool_dir=rt.spool)
        )
        handle = stack.enter_context(safe_open(str(local.path), "pt"))
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key in keys:
                out.add(key, handle, f"round {manifest.round}")
    return out


def _covers(shard: ShardEntry, ordered: list[str]) -> bool:
    """Whether the shard's name range ``[first, last]`` holds any of the sorted ``ordered`` names."""
    import bisect

    i = bisect.bisect_left(ordered, shard.first)
    return i < len(ordered) and ordered[i] <= shard.last
