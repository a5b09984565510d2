"""The index of an accepted delta: where each tensor lies in the file, its digest, scaling and update norm.

The ingest worker builds it while reading every tensor once (:func:`build_index`), so nothing
downstream re-validates, re-hashes a whole file or matches a pattern again: shard tasks fetch
only the byte ranges of their modules (:func:`fetch_ranges`) and check each module's digest
as they turn its bytes into tensors (:func:`module_from_bytes`). Written by a worker, the
index is trusted once written, and still parsed strictly.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..errors import ChecksumMismatch, InvalidAdapter, UpdateTooLarge
from ..factors import MAX_CONDITIONING, conditioning, update_norm
from ..names import INDEX_FORMAT
from .delta import DeltaFile, check_finite
from .fileformat import DTYPES, MAX_NDIM, nbytes
from .header import TensorInfo, in_file_order, strict_json

#: anything at or above this is not a float32 number: the aggregation works in float32
_F32_MAX = float(torch.finfo(torch.float32).max)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WHAT = "delta index"

#: raw bytes a tensor can be built from
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class TensorSpan:
    """A tensor's bytes in a file: absolute offsets ``[begin, end)``, safetensors dtype name and shape."""

    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ModuleEntry:
    """One LoRA module: spans of A and B, rank, resolved scaling, sha256 of A's bytes then B's, ``||s B A||_F``."""

    a: TensorSpan
    b: TensorSpan
    rank: int
    scaling: float
    sha256: str
    norm: float


@dataclass(frozen=True)
class ExtraEntry:
    """One modules_to_save tensor: its span and the sha256 of its bytes."""

    span: TensorSpan
    sha256: str


@dataclass(frozen=True, eq=True)
class DeltaIndex:
    """What the ingest worker learned about an accepted delta file (its sha256 and size included)."""

    sha256: str
    size: int
    modules: Mapping[str, ModuleEntry]
    extras: Mapping[str, ExtraEntry]

    def to_json(self) -> bytes:
        """Deterministic JSON: the same delta gives the same bytes."""
        modules = {name: _module_doc(e) for name, e in self.modules.items()}
        extras = {name: {"span": _span_doc(e.span), "sha256": e.sha256} for name, e in self.extras.items()}
        doc = {"format": INDEX_FORMAT, "sha256": self.sha256, "size": self.size, "modules": modules, "extras": extras}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeltaIndex:
        """Parse :meth:`to_json` output, checking every field; InvalidAdapter otherwise."""
        doc = _fields(strict_json(raw, _WHAT), {"format", "sha256", "size", "modules", "extras"}, _WHAT)
        if doc["format"] != INDEX_FORMAT:
            raise InvalidAdapter(f"{_WHAT}: format is {doc['format']!r}, expected {INDEX_FORMAT!r}")
        size = _int(doc["size"], f"{_WHAT} size")
        modules = {name: _module(name, e, size) for name, e in _mapping(doc["modules"], "modules").items()}
        extras = {name: _extra(name, e, size) for name, e in _mapping(doc["extras"], "extras").items()}
        return cls(
            sha256=_sha(doc["sha256"], f"{_WHAT} sha256"),
            size=size,
            modules=MappingProxyType(dict(sorted(modules.items()))),
            extras=MappingProxyType(dict(sorted(extras.items()))),
        )


def _span_doc(span: TensorSpan) -> dict[str, Any]:
    return {"begin": span.begin, "end": span.end, "dtype": span.dtype, "shape": list(span.shape)}


def _module_doc(e: ModuleEntry) -> dict[str, Any]:
    return {"a": _span_doc(e.a), "b": _span_doc(e.b), "rank": e.rank, "scaling": e.scaling, "sha256": e.sha256,
            "norm": e.norm}  # fmt: skip


def _fields(value: Any, names: Set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.keys() != names:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise InvalidAdapter(f"{what}: expected exactly the fields {sorted(names)}, got {got}")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidAdapter(f"{_WHAT}: {what} must be an object, got {type(value).__name__}")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidAdapter(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _float(value: Any, what: str, *, positive: bool) -> float:
    ok = type(value) in (int, float) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise InvalidAdapter(
            f"{what} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}"
        )
    return float(value)


def _sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidAdapter(f"{what} must be 64 lowercase hex digits, got {value!r}")
    return value


def _count(value: Any) -> bool:
    """Whether ``value`` passes :func:`_int` (checked without building its error message: an index of a large
    model holds hundreds of thousands of these, all parsed on the round's critical path)."""
    return type(value) is int and value >= 0


_SPAN_FIELDS = frozenset({"begin", "end", "dtype", "shape"})
_MODULE_FIELDS = frozenset({"a", "b", "rank", "scaling", "sha256", "norm"})


def _span(value: Any, what: str, size: int) -> TensorSpan:
    doc = _fields(value, _SPAN_FIELDS, what)
    begin, end = doc["begin"], doc["end"]
    if not (_count(begin) and _count(end)):
        begin, end = _int(begin, f"{what} begin"), _int(end, f"{what} end")
    dtype, shape = doc["dtype"], doc["shape"]
    if dtype not in DTYPES:
        raise InvalidAdapter(f"{what}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise InvalidAdapter(f"{what}: shape must be a list of at most {MAX_NDIM} integers, got {shape!r}")
    dims = tuple(shape) if all(_count(d) for d in shape) else tuple(_int(d, f"{what} shape") for d in shape)
    if not begin <= end <= size or end - begin != nbytes(dtype, dims):
        raise InvalidAdapter(f"{what}: [{begin}, {end}) does not hold a {dtype} {list(dims)} inside {size} bytes")
    return TensorSpan(begin=begin, end=end, dtype=dtype, shape=dims)


def _module(name: str, value: Any, size: int) -> ModuleEntry:
    what = f"{_WHAT} module {name!r}"
    doc = _fields(value, _MODULE_FIELDS, what)
    a, b = _span(doc["a"], f"{what} a", size), _span(doc["b"], f"{what} b", size)
    rank = doc["rank"] if _count(doc["rank"]) else _int(doc["rank"], f"{what} rank")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank or rank == 0:
        raise InvalidAdapter(f"{what}: A {list(a.shape)} and B {list(b.shape)} are not a rank-{rank} pair")
    return ModuleEntry(
        a=a,
        b=b,
        rank=rank,
        scaling=_float(doc["scaling"], f"{what} scaling", positive=True),
        sha256=_sha(doc["sha256"], f"{what} sha256"),
        norm=_float(doc["norm"], f"{what} norm", positive=False),
    )


def _extra(name: str, value: Any, size: int) -> ExtraEntry:
    what = f"{_WHAT} extra {name!r}"
    doc = _fields(value, {"span", "sha256"}, what)
    return ExtraEntry(span=_span(doc["span"], f"{what} span", size), sha256=_sha(doc["sha256"], f"{what} sha256"))


# -- building ----------------------------------------------------------------------------------


def _as_tensor(buf: bytearray, info: TensorInfo) -> Tensor:
    dtype = DTYPES[info.dtype][1]
    if not buf:
        return torch.zeros(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _check_value(t: Tensor, label: str) -> None:
    check_finite(t, label)
    # float64 values beyond float32 would turn into inf when the round is aggregated
    if t.dtype == torch.float64 and t.numel() and float(t.abs().max()) >= _F32_MAX:
        raise UpdateTooLarge(f"{label} holds values beyond the float32 range (|x| >= {_F32_MAX:.3g})")


def _check_scaling(module: str, scaling: float) -> None:
    if not scaling < _F32_MAX:
        raise UpdateTooLarge(f"module {module!r}: scaling {scaling:.3g} is beyond float32; lower lora_alpha")


def _check_norm(module: str, norm: float) -> None:
    if not (math.isfinite(norm) and norm < _F32_MAX):
        raise UpdateTooLarge(
            f"module {module!r}: the update s*B@A is not finite in float32 (||s*B@A||_F = {norm:.3g}); "
            "its factors or lora_alpha are far too large"
        )


def _check_conditioning(module: str, kappa: float) -> None:
    if not kappa <= MAX_CONDITIONING:
        raise InvalidAdapter(
            f"module {module!r}: the factors cancel each other (||s*B||*||A|| / ||s*B@A|| = {kappa:.3g},"
            f" above {MAX_CONDITIONING:.0e}); trained LoRA factors are near sqrt(rank): upload B and A as"
            " trained, not rewritten as B@G and G^-1@A"
        )


def build_index(delta: DeltaFile) -> DeltaIndex:
    """Read every tensor of ``delta`` once (checked finite) and index it; the file's sha256 comes along.

    Raises InvalidAdapter for NaN/Inf, UpdateTooLarge for an update ``s * B @ A`` (or a value
    or scaling) that float32 cannot hold. Tensors are read in file order, one or two at a time.
    """
    if sys.byteorder != "little":  # safetensors is little-endian and tensors are built on the raw bytes
        raise RuntimeError("chorus-mq reads tensors from raw bytes only on little-endian hosts")
    structure, header, spec = delta.structure, delta.header, delta.spec
    delta.check_spec()
    owner: dict[str, tuple[str, str]] = {}
    for module, (key_a, key_b) in structure.modules.items():
        owner[key_a], owner[key_b] = (module, "A"), (module, "B")
        if module in structure.sandwich:
            owner[key_a] = (module, "R")
    for key, raw in structure.extras.items():
        owner[raw] = (key, "")
    base = header.data_begin
    digest = hashlib.sha256()
    modules: dict[str, ModuleEntry] = {}
    extras: dict[str, ExtraEntry] = {}
    first: dict[str, TensorInfo] = {}  # a module's factor read before its partner
    last: tuple[str, bytearray, Tensor] | None = None  # the previous tensor, still in memory
    with open(delta.path, "rb", buffering=0) as f:
        head = f.read(base)
        if len(head) != base:
            raise InvalidAdapter(f"{delta.path.name} is shorter than its header")
        digest.update(head)
        for raw_key, info in in_file_order(header):
            buf = bytearray(info.nbytes)
            if f.readinto(buf) != info.nbytes:
                raise InvalidAdapter(f"{delta.path.name} ended inside tensor {raw_key!r} (truncated while read?)")
            digest.update(buf)
            name, which = owner[raw_key]
            label = f"extra {name!r}" if not which else f"module {name!r} lora_{which}"
            t = _as_tensor(buf, info)
            _check_value(t, label)
            span = TensorSpan(base + info.begin, base + info.end, info.dtype, info.shape)
            if not which:
                extras[name] = ExtraEntry(span=span, sha256=hashlib.sha256(buf).hexdigest())
            elif which == "R":
                modules[name] = _sandwich_entry(name, buf, t, span, spec.scaling(name, int(t.shape[0])))
            elif name not in first:
                first[name] = info
            else:
                other = first.pop(name)
                if last is not None and last[0] == structure.modules[name][0 if which == "B" else 1]:
                    other_buf, other_t = last[1], last[2]
                else:  # not adjacent (a file we did not write): read the partner again
                    other_buf = bytearray(os.pread(f.fileno(), other.nbytes, base + other.begin))
                    other_t = _as_tensor(other_buf, other)
                other_span = TensorSpan(base + other.begin, base + other.end, other.dtype, other.shape)
                parts = {which: (buf, t, span), ("A" if which == "B" else "B"): (other_buf, other_t, other_span)}
                modules[name] = _module_entry(name, parts, spec.scaling(name, int(parts["A"][1].shape[0])))
            last = (raw_key, buf, t)
    return DeltaIndex(
        sha256=digest.hexdigest(),
        size=base + header.data_len,
        modules=MappingProxyType(dict(sorted(modules.items()))),
        extras=MappingProxyType(dict(sorted(extras.items()))),
    )


def _module_entry(
    module: str, parts: Mapping[str, tuple[bytearray, Tensor, TensorSpan]], scaling: float
) -> ModuleEntry:
    (buf_a, A, span_a), (buf_b, B, span_b) = parts["A"], parts["B"]
    _check_scaling(module, scaling)  # first: squaring a huge scaling overflows
    norm = update_norm(A, B, scaling)
    _check_norm(module, norm)
    _check_conditioning(module, conditioning(A, B, norm, scaling))
    pair = hashlib.sha256(buf_a)
    pair.update(buf_b)
    return ModuleEntry(a=span_a, b=span_b, rank=int(A.shape[0]), scaling=scaling, sha256=pair.hexdigest(), norm=norm)


def _sandwich_entry(module: str, buf: bytearray, r: Tensor, span: TensorSpan, scaling: float) -> ModuleEntry:
    """A Fed-SB module: ``lora_R`` stands as both A and B (the frame is the federation's, not the upload's);
    the norm is ``||s R||_F``, the update's own under an orthonormal frame (the default)."""
    _check_scaling(module, scaling)
    norm = abs(scaling) * float(torch.linalg.vector_norm(r.to(torch.float64)))
    _check_norm(module, norm)
    pair = hashlib.sha256(buf)
    pair.update(buf)
    return ModuleEntry(a=span, b=span, rank=int(r.shape[0]), scaling=scaling, sha256=pair.hexdigest(), norm=norm)


# -- reading -------------------------------------------------------------------------------------


def tensors_from_bytes(span: TensorSpan, raw: Buffer) -> Tensor:
    """The tensor ``span`` describes, built on ``raw`` (its bytes): dtype and shape checked.

    Zero-copy for writable buffers (``bytearray``, writable ``memoryview``); read-only ones
    (``bytes``) are copied once, because torch tensors are writable and must not alias them.
    """
    if sys.byteorder != "little":
        raise RuntimeError("chorus-mq reads tensors from raw bytes only on little-endian hosts")
    view = memoryview(raw).cast("B")
    if span.dtype not in DTYPES:
        raise InvalidAdapter(f"span dtype {span.dtype!r} is not one of {', '.join(DTYPES)}")
    need = nbytes(span.dtype, span.shape)
    if view.nbytes != need or span.nbytes != need:
        raise InvalidAdapter(
            f"got {view.nbytes} bytes for a {span.dtype} {list(span.shape)} tensor "
            f"spanning {span.nbytes} ({need} needed)"
        )
    dtype = DTYPES[span.dtype][1]
    if not need:
        return torch.zeros(span.shape, dtype=dtype)
    buffer = bytearray(view) if view.readonly else view
    return torch.frombuffer(buffer, dtype=dtype).reshape(span.shape)


def module_from_bytes(entry: ModuleEntry, raw_a: Buffer, raw_b: Buffer) -> tuple[Tensor, Tensor]:
    """``(A, B)`` from the bytes of their spans; ChecksumMismatch unless they hash to ``entry.sha256``."""
    for name, raw, span in (("A", raw_a, entry.a), ("B", raw_b, entry.b)):
        if memoryview(raw).nbytes != span.nbytes:
            raise InvalidAdapter(f"lora_{name}: got {memoryview(raw).nbytes} bytes, its span holds {span.nbytes}")
    pair = hashlib.sha256(raw_a)
    pair.update(raw_b)
    if pair.hexdigest() != entry.sha256:
        raise ChecksumMismatch(
            f"module bytes hash to {pair.hexdigest()}, but {entry.sha256} was indexed at ingest: "
            "the accepted delta changed since"
        )
    return tensors_from_bytes(entry.a, raw_a), tensors_from_bytes(entry.b, raw_b)


def extra_from_bytes(entry: ExtraEntry, raw: Buffer) -> Tensor:
    """An extra from the bytes of its span; ChecksumMismatch unless they hash to ``entry.sha256``."""
    if memoryview(raw).nbytes != entry.span.nbytes:
        raise InvalidAdapter(f"extra: got {memoryview(raw).nbytes} bytes, its span holds {entry.span.nbytes}")
    got = hashlib.sha256(raw).hexdigest()
    if got != entry.sha256:
        raise ChecksumMismatch(f"extra bytes hash to {got}, but {entry.sha256} was indexed at ingest")
    return tensors_from_bytes(entry.span, raw)


def fetch_ranges(index: DeltaIndex, names: Iterable[str]) -> list[tuple[int, int]]:
    """The fewest byte ranges ``[begin, end)`` that hold the tensors of ``names`` (modules or extras).

    Adjacent spans are merged, so the modules of a shard that lie side by side in the file
    take one read.
    """
    spans: list[TensorSpan] = []
    for name in names:
        if name in index.modules:
            spans += (index.modules[name].a, index.modules[name].b)
        elif name in index.extras:
            spans.append(index.extras[name].span)
        else:
            raise InvalidAdapter(f"{name!r} is neither a module nor an extra of delta {index.sha256[:12]}")
    ranges: list[tuple[int, int]] = []
    for span in sorted(spans, key=lambda s: (s.begin, s.end)):
        if span.begin == span.end:
            continue
        if ranges and span.begin <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], span.end))
        else:
            ranges.append((span.begin, span.end))
    return ranges


def slice_span(blocks: Sequence[tuple[int, Buffer]], span: TensorSpan) -> memoryview:
    """The bytes of ``span`` inside fetched ``blocks`` (``(begin, data)`` sorted by begin), without copying."""
    starts = [begin for begin, _ in blocks]
    i = bisect.bisect_right(starts, span.begin) - 1
    if i >= 0:
        begin, data = blocks[i]
        view = memoryview(data).cast("B")
        if span.end <= begin + view.nbytes:
            return view[span.begin - begin : span.end - begin]
    raise InvalidAdapter(f"bytes [{span.begin}, {span.end}) were not fetched")
