"""Strict safetensors header parsing: trusts nothing it reads.

Everything here runs on bytes a client sent us, before any tensor library sees them:
every length, offset and dimension is checked against the real file size, so a lying
header can neither make us allocate nor read out of bounds. Only float dtypes pass,
except when reading a base model's checkpoint (``any_dtype``), which holds integer buffers.
Writing lives in :mod:`.writer`; the layout rule of the files we write in :mod:`.fileformat`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import InvalidAdapter, LimitExceeded, TooLarge
from ..settings import Settings
from .fileformat import DTYPES, MAX_DIM, MAX_NDIM

# re-exported: callers that predate the writer module import it from here
from .writer import write_safetensors as write_safetensors  # noqa: PLC0414

#: item sizes of the other dtypes a model checkpoint may hold (read with ``any_dtype=True``)
_OTHER_ITEMSIZES: dict[str, int] = {
    "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
DEFAULT_MAX_HEADER_BYTES: int = Settings.model_fields["max_header_bytes"].default

_SNIFF_BYTES = 512
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "a zip archive (torch.save and PyTorch .bin checkpoints are zipped pickles)"),
    (0, b"PK\x05\x06", "a zip archive"),
    (0, b"\x1f\x8b", "a gzip file"),
    (0, b"BZh", "a bzip2 file"),
    (0, b"\xfd7zXZ\x00", "an xz file"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd file"),
    (0, b"\x93NUMPY", "a NumPy .npy file"),
    (0, b"GGUF", "a GGUF file"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (257, b"ustar", "a tar archive"),
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    header_len: int
    data_len: int

    @property
    def data_begin(self) -> int:
        """File offset of the first byte of tensor data."""
        return 8 + self.header_len


def sniff(prefix: bytes) -> str | None:
    """Name the format of a file that starts with ``prefix`` if it is a known non-safetensors one."""
    # pickle protocols 2-5 start with PROTO <n>; 0/1 have no magic and fail the structural checks
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a Python pickle (torch.save / PyTorch .bin format)"
    for offset, magic, kind in _MAGICS:
        if prefix[offset : offset + len(magic)] == magic:
            return kind
    return None


def strict_json(raw: bytes | str, what: str) -> Any:
    """Parse untrusted JSON: UTF-8 only, no duplicate keys, no NaN/Infinity; errors name ``what``."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)  # in C; a lost pair shows as a shorter dict
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise InvalidAdapter(f"{what}: duplicate key {key!r} (ambiguous, refusing to pick one)")
                seen.add(key)
        return out

    def no_constant(name: str) -> None:
        raise InvalidAdapter(f"{what}: {name} is not valid JSON")

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise InvalidAdapter(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() digit limits on absurd numbers
        raise InvalidAdapter(f"{what} is not valid JSON: {exc}") from None


def read_header(
    source: str | os.PathLike[str] | BinaryIO | bytes,
    *,
    max_header_bytes: int,
    any_dtype: bool = False,
    max_tensors: int | None = None,
) -> Header:
    """Validate the safetensors header of a path, a binary file object or raw bytes.

    Reads at most the header, never tensor data. Raises InvalidAdapter (TooLarge for an
    oversized header) with a message naming the problem. ``any_dtype`` also accepts the
    integer and 8-bit dtypes of model checkpoints (never for deltas). ``max_tensors``
    refuses (LimitExceeded) a header listing more tensors, before its JSON is parsed.
    """
    if isinstance(source, bytes):
        return _read(io.BytesIO(source), max_header_bytes, any_dtype, max_tensors)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _read(f, max_header_bytes, any_dtype, max_tensors)
    return _read(source, max_header_bytes, any_dtype, max_tensors)


def header_from_prefix(prefix: bytes, *, max_header_bytes: int) -> Header:
    """Validate a header given only a file's first ``8 + n`` bytes (what a ranged read fetches).

    The data length is what the entries tile; whoever streams the data must check it has
    exactly ``data_len`` bytes.
    """
    if len(prefix) < 8:
        raise InvalidAdapter(f"header prefix is {len(prefix)} bytes, shorter than the 8-byte length field")
    n = int.from_bytes(prefix[:8], "little")
    if n > max_header_bytes:
        raise TooLarge(f"safetensors header is {n} bytes, over the {max_header_bytes}-byte limit")
    if len(prefix) != 8 + n:
        raise InvalidAdapter(f"header prefix is {len(prefix)} bytes but its length field says 8 + {n}")
    raw = prefix[8:]
    if raw[:1] != b"{":
        raise InvalidAdapter("header does not start with '{': not a safetensors file")
    parsed = strict_json(raw, "safetensors header")
    if not isinstance(parsed, dict):
        raise InvalidAdapter(f"safetensors header must be a JSON object, got {type(parsed).__name__}")
    ends = [e.get("data_offsets") for k, e in parsed.items() if k != "__metadata__" and isinstance(e, dict)]
    # a provisional length: every entry is still checked against it and the layout must tile it exactly
    data_len = max((o[1] for o in ends if isinstance(o, list) and len(o) == 2 and _is_int(o[1])), default=0)
    return _validate(parsed, header_len=n, data_len=data_len, any_dtype=False)


def _count_tensors(raw: bytes, max_tensors: int) -> None:
    # every tensor entry has exactly one "data_offsets" key, and a quote inside a JSON string is
    # escaped, so this counts entries without parsing (in C, on bytes)
    n = raw.count(b'"data_offsets"')
    if n > max_tensors:
        raise LimitExceeded(f"the header lists {n} tensors, over the limit of {max_tensors} for this federation")


def _read(f: BinaryIO, max_header_bytes: int, any_dtype: bool, max_tensors: int | None) -> Header:
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    head = f.read(_SNIFF_BYTES)
    if size == 0:
        raise InvalidAdapter("empty file (0 bytes); expected a safetensors file")
    n = int.from_bytes(head[:8], "little") if size >= 8 else -1
    looks_right = 2 <= n <= size - 8 and head[8:9] == b"{"
    kind = None if looks_right else sniff(head)
    if kind:
        raise InvalidAdapter(
            f"this is {kind}, not safetensors; only safetensors is accepted "
            "(pickle-based formats run code when loaded). Re-save with save_pretrained()/safetensors."
        )
    if size < 8:
        raise InvalidAdapter(f"truncated file: {size} bytes, shorter than the 8-byte safetensors header length")
    if n < 2:
        raise InvalidAdapter(f"header length is {n}; a safetensors header is at least '{{}}' (2 bytes)")
    if n > max_header_bytes:
        raise TooLarge(
            f"safetensors header is {n} bytes, over the {max_header_bytes}-byte limit (CHORUS_MAX_HEADER_BYTES)"
        )
    if n > size - 8:
        raise InvalidAdapter(
            f"header length {n} points past the end of the file ({size} bytes): truncated file or lying header"
        )
    f.seek(8)
    raw = f.read(n)
    if raw[:1] != b"{":
        raise InvalidAdapter("header does not start with '{': not a safetensors file")
    if max_tensors is not None:
        _count_tensors(raw, max_tensors)
    parsed = strict_json(raw, "safetensors header")
    return _validate(parsed, header_len=n, data_len=size - 8 - n, any_dtype=any_dtype)


def _validate(obj: Any, *, header_len: int, data_len: int, any_dtype: bool) -> Header:
    if not isinstance(obj, dict):
        raise InvalidAdapter(f"safetensors header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapter("__metadata__ must map strings to strings (safetensors format)")
    tensors = {name: _entry(name, e, data_len, any_dtype) for name, e in obj.items() if name != "__metadata__"}
    _check_layout(tensors, data_len)
    return Header(tensors=tensors, metadata=metadata, header_len=header_len, data_len=data_len)


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON true/false arrive as bool, a subclass of int


def _itemsize(name: str, dtype: Any, any_dtype: bool) -> int:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype][0]
    if any_dtype and isinstance(dtype, str) and dtype in _OTHER_ITEMSIZES:
        return _OTHER_ITEMSIZES[dtype]
    raise InvalidAdapter(f"tensor {name!r} has dtype {dtype!r}; only {', '.join(DTYPES)} are accepted for LoRA deltas")


def _entry(name: str, e: Any, data_len: int, any_dtype: bool) -> TensorInfo:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise InvalidAdapter(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {got}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    itemsize = _itemsize(name, dtype, any_dtype)
    # type(...) is int: JSON true/false arrive as bool, a subclass of int (inlined: this runs per tensor)
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise InvalidAdapter(f"tensor {name!r} has shape {shape!r}: dimensions must be integers in [0, {MAX_DIM}]")
    if len(shape) > MAX_NDIM:
        raise InvalidAdapter(f"tensor {name!r} has {len(shape)} dimensions, more than {MAX_NDIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and type(offsets[0]) is type(offsets[1]) is int):
        raise InvalidAdapter(f"tensor {name!r}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InvalidAdapter(f"tensor {name!r}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if end > data_len:
        raise InvalidAdapter(
            f"tensor {name!r}: data_offsets [{begin}, {end}] reach past the {data_len} bytes of tensor data "
            "in the file (truncated file or lying header)"
        )
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise InvalidAdapter(
            f"tensor {name!r}: shape {shape} of {dtype} is {nbytes} bytes but data_offsets span {end - begin}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(tensors: Mapping[str, TensorInfo], data_len: int) -> None:
    # safetensors requires the data region to be tiled exactly: no overlap (aliasing), no gaps
    expected, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
        if info.begin < expected:
            raise InvalidAdapter(f"tensors {previous!r} and {name!r} have overlapping data_offsets")
        if info.begin > expected:
            raise InvalidAdapter(f"gap of {info.begin - expected} bytes in the data region before tensor {name!r}")
        expected, previous = info.end, name
    if expected != data_len:
        raise InvalidAdapter(
            f"{data_len - expected} bytes after the last tensor are not described by the header "
            "(safetensors requires the data region to be fully covered)"
        )


def in_file_order(header: Header) -> list[tuple[str, TensorInfo]]:
    """The header's tensors in the order their bytes appear in the file."""
    return sorted(header.tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0]))
