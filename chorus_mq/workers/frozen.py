"""Ingest's check of a frozen shared factor (ffa-lora, rolora): bit-identical to the one the round started from.

A strategy that freezes a factor (chorus_mq/strategy.py) is exact only if every client's frozen factor
is the one published by the round it started from (the latest complete round while this round is
open: rounds open one at a time; in a buffered federation, the delta's base version). The published
factors are float32, so an upload must carry the frozen factor as float32 with the very same bytes;
ingest compares sha256 digests of the raw bytes, read from the delta file it has just verified, against
digests of the published tensors (computed once per worker and start round).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import BinaryIO

from ..adapters.index import DeltaIndex, TensorSpan
from ..errors import IncompatibleDelta, InvalidAdapter
from ..names import Factor
from ..strategy import strategy_spec
from .previous import previous_global
from .runtime import Runtime

#: (federation, start round, its manifest's sha256, factor) -> {module: (shape, sha256 of the float32 bytes)};
#: one start per federation (the manifest's hash: a federation re-created under the same name is another start)
_CACHE: dict[tuple[str, int, str, Factor], dict[str, tuple[tuple[int, ...], str]]] = {}
_LOCK = threading.Lock()
#: starts (versions) kept per federation
_STARTS_KEPT = 4


class FrozenFactorChanged(IncompatibleDelta):
    """An upload's frozen factor is not bit-identical to the one its round started from."""


def check_upload_kind(strategy: str, sandwich: frozenset[str], modules: int) -> None:
    """IncompatibleDelta unless a Fed-SB federation's upload carries ``lora_R`` only and any other's none
    (``sandwich``: the upload's lora_R modules, of ``modules``); from the header alone."""
    if strategy_spec(strategy).sandwich:
        if len(sandwich) != modules:
            raise IncompatibleDelta(
                f"this {strategy} federation trains lora_R only: upload '<module>.lora_R.weight' (rank x rank, "
                "float32) for each module, without lora_A / lora_B (they are the published frame)"
            )
    elif sandwich:
        raise IncompatibleDelta(
            f"lora_R (module {sorted(sandwich)[0]!r}) is Fed-SB's; this federation uses {strategy}: upload "
            "lora_A / lora_B"
        )


def check_frozen(
    rt: Runtime, federation: str, r: int, strategy: str, index: DeltaIndex, path: Path, start: int | None = None
) -> None:
    """IncompatibleDelta unless every module's frozen factor in the delta at ``path`` (indexed as ``index``)
    is, byte for byte, the one the round's start published; nothing for strategies that freeze nothing.
    ``start``: the version the delta trained from (a buffered delta's base version, checked published);
    None: the latest complete round (a synchronous round's start). Fed-SB uploads no frozen factor: each
    module's lora_R must be float32 (rank x rank) at the frame's rank."""
    spec = strategy_spec(strategy)
    frozen = spec.frozen(r)
    if frozen is None and not spec.sandwich:
        return
    if start is None:
        start = rt.state.latest_complete(federation)
    if start is None:
        raise InvalidAdapter(f"this {strategy} federation has no published start (round 0) to check the frozen factor")
    if spec.sandwich:
        _check_r(_published(rt, federation, start, Factor.LORA_A), index, strategy, start)
        return
    assert frozen is not None
    expected = _published(rt, federation, start, frozen)
    with path.open("rb") as f:
        for module, entry in sorted(index.modules.items()):
            want = expected.get(module)
            if want is None:
                raise IncompatibleDelta(
                    f"module {module!r} is not in the adapter round {start} published; a {strategy} round trains "
                    "only the published modules"
                )
            span = entry.a if frozen == Factor.LORA_A else entry.b
            _compare(f, module, span, want, frozen, strategy, r, start)


def _check_r(frame: dict[str, tuple[tuple[int, ...], str]], index: DeltaIndex, strategy: str, start: int) -> None:
    for module, entry in sorted(index.modules.items()):
        want = frame.get(module)
        if want is None:
            raise IncompatibleDelta(
                f"module {module!r} is not in the adapter round {start} published; a {strategy} round trains "
                "only the published modules"
            )
        rank = want[0][0]
        if entry.a.dtype != "F32" or entry.a.shape != (rank, rank):
            raise IncompatibleDelta(
                f"module {module!r}: this {strategy} federation's lora_R is float32 [{rank}, {rank}] (the rank of "
                f"the frame round {start} published); the upload's is {entry.a.dtype} {list(entry.a.shape)}"
            )


def _compare(
    f: BinaryIO,
    module: str,
    span: TensorSpan,
    want: tuple[tuple[int, ...], str],
    frozen: Factor,
    strategy: str,
    r: int,
    start: int,
) -> None:
    shape, digest = want
    what = f"module {module!r}: round {r} of this {strategy} federation freezes {frozen}"
    if span.dtype != "F32" or span.shape != shape:
        raise FrozenFactorChanged(
            f"{what}, published by round {start} as float32 {list(shape)}; the upload's is {span.dtype} "
            f"{list(span.shape)}: upload it unchanged (train only the round's trainable factor)"
        )
    f.seek(span.begin)
    got = hashlib.sha256(f.read(span.nbytes)).hexdigest()
    if got != digest:
        raise FrozenFactorChanged(
            f"{what}; the upload's {frozen} is not bit-identical to the one round {start} published "
            f"(sha256 {got[:12]}... against {digest[:12]}...): upload it unchanged"
        )


def _published(rt: Runtime, federation: str, start: int, factor: Factor) -> dict[str, tuple[tuple[int, ...], str]]:
    key = (federation, start, rt.state.round(federation, start).manifest_sha256, factor)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    modules = sorted(rt.state.modules(federation))
    published = previous_global(rt, federation, start, modules)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, module in published.modules.items():
        tensor = module.A if factor == Factor.LORA_A else module.B
        raw = tensor.float().contiguous().numpy().tobytes()  # the shards are float32: no rounding
        out[name] = (tuple(tensor.shape), hashlib.sha256(raw).hexdigest())
    with _LOCK:
        # a synchronous federation never asks for an earlier start again; a buffered one asks for the bases
        # of deltas still in flight, the latest few versions (most recently added last)
        mine = [k for k in _CACHE if k[0] == federation]
        for old in mine[: max(0, len(mine) + 1 - _STARTS_KEPT)]:
            del _CACHE[old]
        _CACHE[key] = out
    return out
