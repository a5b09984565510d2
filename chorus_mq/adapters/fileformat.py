"""The safetensors dtypes we accept and the one layout rule of every file chorus-mq writes.

Tensors are listed widest dtype first, then by name (:func:`canonical_key`). That keeps every
tensor aligned to its item size, makes identical tensors give identical bytes, and puts a file
whose tensors share one dtype (every aggregated output is fp32) in name order, so concatenating
the shards of a round in name order gives the round's file byte for byte.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import InvalidAdapter

#: safetensors dtype name -> (itemsize, torch dtype); nothing else is a LoRA factor
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "BF16": (2, torch.bfloat16),
    "F16": (2, torch.float16),
}
#: torch dtype -> safetensors dtype name
NAMES: dict[torch.dtype, str] = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}
#: generous for modules_to_save extras; LoRA keys are held to 2-D by the caller
MAX_NDIM = 8
#: larger dims exist in no model and would overflow the i64/usize arithmetic downstream
MAX_DIM = 2**31 - 1
#: the data region starts at a multiple of this (the header is padded with spaces)
HEADER_ALIGN = 8

#: one tensor of a file's layout: (name, safetensors dtype name, shape)
Entry = tuple[str, str, tuple[int, ...]]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The safetensors name of a float dtype given as a torch dtype or a name; InvalidAdapter otherwise."""
    name = dtype if isinstance(dtype, str) else NAMES.get(dtype)
    if name not in DTYPES:
        raise InvalidAdapter(f"dtype {dtype} cannot be written; use one of {', '.join(DTYPES)}")
    return name


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype][0]


def canonical_key(name: str, dtype: str) -> tuple[int, str]:
    """Sort key of the tensor order of every file chorus-mq writes: widest dtype first, then name."""
    return -DTYPES[dtype][0], name


def check_canonical(entries: Iterable[Entry], what: str) -> None:
    """Refuse a layout that is not in :func:`canonical_key` order (or names a tensor twice)."""
    previous: tuple[int, str] | None = None
    for name, dtype, _ in entries:
        key = canonical_key(name, dtype)
        if previous is not None and key <= previous:
            raise InvalidAdapter(
                f"{what}: tensor {name!r} ({dtype}) comes after {previous[1]!r}; files are written widest "
                "dtype first, then by name (sort the layout with sorted(layout, key=layout_key))"
            )
        previous = key


def encode_header(entries: Iterable[Entry], metadata: Mapping[str, str]) -> bytes:
    """The first ``8 + n`` bytes of a safetensors file whose tensors ``(name, dtype, shape)`` follow in order.

    Deterministic: sorted JSON keys, no spaces, padded with spaces so the data starts 8-aligned.
    """
    if sys.byteorder != "little":  # the format is little-endian and we write raw memory
        raise RuntimeError("chorus-mq writes safetensors only on little-endian hosts")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise InvalidAdapter(f"tensor {name!r} appears twice in a file's layout")
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw
