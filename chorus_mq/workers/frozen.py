"""Ingest's check of a frozen shared factor (ffa-lora, rolora): bit-identical to the one the round started from.

A strategy that freezes a factor (chorus_mq/strategy.py) is exact only if every client's frozen factor
is the one published by the round it started from (the latest complete round while this round is
open: rounds open one at a time). The published factors are float32, so an upload must carry the
frozen factor as float32 with the very same bytes; ingest compares sha256 digests of the raw bytes,
read from the delta file it has just verified, against digests of the published tensors (computed
once per worker and start round).
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


class FrozenFactorChanged(IncompatibleDelta):
    """An upload's frozen factor is not bit-identical to the one its round started from."""


def check_frozen(rt: Runtime, federation: str, r: int, strategy: str, index: DeltaIndex, path: Path) -> None:
    """IncompatibleDelta unless every module's frozen factor in the delta at ``path`` (indexed as ``index``)
    is, byte for byte, the one the round's start published; nothing for strategies that freeze nothing."""
    frozen = strategy_spec(strategy).frozen(r)
    if frozen is None:
        return
    start = rt.state.latest_complete(federation)
    if start is None:
        raise InvalidAdapter(f"this {strategy} federation has no published start (round 0) to check the frozen factor")
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
        for old in [k for k in _CACHE if k[0] == federation]:
            del _CACHE[old]  # a federation's earlier starts are never asked for again
        _CACHE[key] = out
    return out
