"""Strict safetensors header parsing (trusts nothing it reads) and a deterministic writer.

Everything here runs on bytes a client sent us, before any tensor library sees them:
every length, offset and dimension is checked against the real file size, so a lying
header can neither make us allocate nor read out of bounds. Only float dtypes pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

from ..errors import InvalidAdapter, TooLarge
from ..settings import Settings

#: safetensors dtype name -> (itemsize, torch dtype); nothing else is a LoRA factor
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "BF16": (2, torch.bfloat16),
    "F16": (2, torch.float16),
}
_NAMES = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}
#: generous for modules_to_save extras; LoRA keys are held to 2-D by the caller
MAX_NDIM = 8
#: larger dims exist in no model and would overflow the i64/usize arithmetic downstream
MAX_DIM = 2**31 - 1
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
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise InvalidAdapter(f"{what}: duplicate key {key!r} (ambiguous, refusing to pick one)")
            out[key] = value
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


def read_header(source: str | os.PathLike[str] | BinaryIO | bytes, *, max_header_bytes: int) -> Header:
    """Validate the safetensors header of a path, a binary file object or raw bytes.

    Reads at most the header, never tensor data. Raises InvalidAdapter (TooLarge for an
    oversized header) with a message naming the problem.
    """
    if isinstance(source, bytes):
        return _read(io.BytesIO(source), max_header_bytes)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _read(f, max_header_bytes)
    return _read(source, max_header_bytes)


def _read(f: BinaryIO, max_header_bytes: int) -> Header:
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
    parsed = strict_json(raw, "safetensors header")
    return _validate(parsed, header_len=n, data_len=size - 8 - n)


def _validate(obj: Any, *, header_len: int, data_len: int) -> Header:
    if not isinstance(obj, dict):
        raise InvalidAdapter(f"safetensors header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapter("__metadata__ must map strings to strings (safetensors format)")
    tensors = {name: _entry(name, e, data_len) for name, e in obj.items() if name != "__metadata__"}
    _check_layout(tensors, data_len)
    return Header(tensors=tensors, metadata=metadata, header_len=header_len, data_len=data_len)


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON true/false arrive as bool, a subclass of int


def _entry(name: str, e: Any, data_len: int) -> TensorInfo:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise InvalidAdapter(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {got}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPES:
        raise InvalidAdapter(
            f"tensor {name!r} has dtype {dtype!r}; only {', '.join(DTYPES)} are accepted for LoRA deltas"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise InvalidAdapter(f"tensor {name!r} has shape {shape!r}: dimensions must be integers in [0, {MAX_DIM}]")
    if len(shape) > MAX_NDIM:
        raise InvalidAdapter(f"tensor {name!r} has {len(shape)} dimensions, more than {MAX_NDIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InvalidAdapter(f"tensor {name!r}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InvalidAdapter(f"tensor {name!r}: data_offsets [{begin}, {end}] are not 0 <= begin <= end")
    if end > data_len:
        raise InvalidAdapter(
            f"tensor {name!r}: data_offsets [{begin}, {end}] reach past the {data_len} bytes of tensor data "
            "in the file (truncated file or lying header)"
        )
    nbytes = math.prod(shape) * DTYPES[dtype][0]
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


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as safetensors with byte-identical output for identical input; return sha256 hex.

    The safetensors library orders ``__metadata__`` by a randomly seeded hash map, so two
    runs differ; we serialise ourselves (sorted JSON, widest dtype first so every tensor
    stays aligned) and write atomically (temp file + rename).
    """
    if sys.byteorder != "little":  # the format is little-endian and we write raw memory
        raise RuntimeError("write_safetensors needs a little-endian host")
    parts: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise InvalidAdapter(f"cannot write tensor {name!r} of dtype {t.dtype}; use one of {', '.join(DTYPES)}")
        parts.append((name, t.detach().cpu().contiguous()))
    parts.sort(key=lambda p: (-p[1].element_size(), p[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in parts:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (len(raw).to_bytes(8, "little"), raw):
                f.write(chunk)
                digest.update(chunk)
            for _, t in parts:
                buf = t.reshape(-1).view(torch.uint8).numpy()
                f.write(buf)
                digest.update(buf)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()
