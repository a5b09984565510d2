"""A masked input as a store object: one uint64 tensor ``masked`` in safetensors (8 bytes an element)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import PeerMisbehaved, SecAggError
from .encoding import U64, Encoded

#: the tensor name inside a masked-input object
MASKED_TENSOR = "masked"


def parse_masked(client: str, raw: bytes, sha256: str, length: int) -> Encoded:
    """A masked input's bytes: the sha256 the record named, one uint64 tensor of the round's length."""
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise PeerMisbehaved(client, "its masked input does not match the sha256 its record names")
    from safetensors.numpy import load

    try:
        tensors = load(raw)
    except Exception as exc:
        raise PeerMisbehaved(client, f"its masked input is not safetensors: {str(exc)[:100]}") from None
    t = tensors.get(MASKED_TENSOR)
    if set(tensors) != {MASKED_TENSOR} or t is None or t.dtype != U64 or t.shape != (length,):
        raise PeerMisbehaved(
            client, f"its masked input must hold exactly {MASKED_TENSOR!r}, uint64 of {length} elements"
        )
    return np.ascontiguousarray(t)


def masked_bytes(vector: Encoded) -> bytes:
    """What a client uploads as its masked input (the inverse of :func:`parse_masked`)."""
    from safetensors.numpy import save

    return save({MASKED_TENSOR: np.ascontiguousarray(vector, dtype=U64)})


def data_begin(prefix: bytes, length: int) -> int:
    """Where the words of a masked-input object begin, from its first ``8 + n`` bytes (``n``: the header length
    its first 8 bytes give), checked to describe exactly ``length`` uint64 words: what a shard of a sharded unmask
    needs to read a slice of the object by range."""
    if len(prefix) < 8:
        raise SecAggError("a masked-input object is shorter than its 8-byte header length")
    n = int.from_bytes(prefix[:8], "little")
    if len(prefix) != 8 + n:
        raise SecAggError(f"a masked-input header is {len(prefix) - 8} bytes, its length field says {n}")
    try:
        header = json.loads(prefix[8:])
    except ValueError:
        raise SecAggError("a masked-input header is not JSON") from None
    entry = header.get(MASKED_TENSOR) if isinstance(header, dict) else None
    want = {"dtype": "U64", "shape": [length], "data_offsets": [0, 8 * length]}
    if set(header) - {MASKED_TENSOR, "__metadata__"} or not isinstance(entry, dict) or entry != want:
        raise SecAggError(f"a masked-input header must describe exactly {MASKED_TENSOR!r}, uint64 of {length} elements")
    return 8 + n
