"""A masked input as a store object: one uint64 tensor ``masked`` in safetensors (8 bytes an element)."""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import PeerMisbehaved
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
