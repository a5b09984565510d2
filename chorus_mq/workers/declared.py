"""The model a federation declared at creation, as the workers use it: module order, presence bitmaps.

Module order is the sorted declared module names; a delta record names the modules it carries
as a bitmap over that order (a few dozen bytes instead of a list of names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..adapters import DeltaIndex, ModelDecl
from ..state import FederationConfig
from .runtime import Runtime


@dataclass(frozen=True)
class Declared:
    decl: ModelDecl
    modules: tuple[str, ...]  # sorted
    extras: tuple[str, ...]  # sorted
    #: what a delta must match: the declared model, less its task head where clients keep theirs
    #: (``--personal-heads``: round 0's head is what every round publishes)
    uploads: ModelDecl
    heads_local: bool = False


_cache: dict[tuple[str, str], Declared] = {}


def declared_model(rt: Runtime, federation: str, config: FederationConfig) -> Declared:
    """The federation's declared modules and extras (cached per process: they never change)."""
    created = str(rt.state.meta(federation).get("created_at", ""))
    key = (federation, created)
    found = _cache.get(key)
    if found is None:
        modules = rt.state.modules(federation)
        extras = rt.state.extras(federation)
        decl = ModelDecl(
            modules=modules,
            extras=extras,
            fan_in_fan_out=config.fan_in_fan_out,
            task_type=None if config.task_type is None else str(config.task_type),
        )
        uploads = dataclasses.replace(decl, extras={}) if config.personal_heads else decl
        found = Declared(
            decl=decl,
            modules=tuple(sorted(modules)),
            extras=tuple(sorted(extras)),
            uploads=uploads,
            heads_local=config.personal_heads,
        )
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = found
    return found


def present_bitmap(declared: tuple[str, ...], present: Collection[str]) -> str:
    """Hex bitmap: bit i is set when ``declared[i]`` is in ``present``."""
    bits = 0
    for i, name in enumerate(declared):
        if name in present:
            bits |= 1 << i
    return format(bits, "x")


def present_modules(declared: tuple[str, ...], bitmap: str) -> frozenset[str]:
    bits = int(bitmap, 16)
    return frozenset(name for i, name in enumerate(declared) if bits >> i & 1)


def tensor_bytes(index: DeltaIndex, modules: Iterable[str] | None = None) -> int:
    """Bytes of the LoRA factors (of ``modules``, default all) and extras in a delta."""
    names = index.modules if modules is None else modules
    total = 0
    for name in names:
        entry = index.modules[name]
        total += (entry.a.end - entry.a.begin) + (entry.b.end - entry.b.begin)
    if modules is None:
        total += sum(e.span.end - e.span.begin for e in index.extras.values())
    return total
