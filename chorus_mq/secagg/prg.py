"""The mask generator: a ChaCha20 keystream (from ``cryptography``) read as little-endian uint64.

A seed is a 32-byte key used for exactly one mask (pairwise seeds come out of HKDF with the
round and the pair in its info; self-mask seeds are fresh random), so the nonce is a constant.
ChaCha20 is seekable: word ``i`` of a mask lies in 64-byte block ``i // 8``, so a worker that
unmasks elements ``[offset, offset + n)`` starts the block counter there (a sharded unmask).
Masks are added in place in chunks of 2 MiB so a 50 MB vector never needs a second full copy.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import SecAggError
from .encoding import U64, Encoded
from .keys import SEED_BYTES

_NONCE = bytes(12)  # ChaCha20 in cryptography takes a 4-byte little-endian block counter + this 12-byte nonce
_WORDS_PER_BLOCK = 8  # 64-byte ChaCha20 blocks of uint64 words
_CHUNK = 1 << 18  # uint64 words per step (2 MiB)
_ZEROS = bytes(8 * _CHUNK)


def _stream(seed: bytes, block: int = 0):  # type: ignore[no-untyped-def]
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= block < 2**32:
        raise SecAggError(f"a mask offset beyond 2^32 ChaCha20 blocks (block {block})")
    return Cipher(algorithms.ChaCha20(seed, block.to_bytes(4, "little") + _NONCE), mode=None).encryptor()


def mask(seed: bytes, length: int) -> Encoded:
    """The mask of ``seed``: ``length`` uniform uint64 words."""
    out = np.zeros(length, dtype=U64)
    add_mask(out, seed, +1)
    return out


def add_mask(acc: Encoded, seed: bytes, sign: int, offset: int = 0) -> None:
    """``acc += sign * mask(seed)[offset : offset + len(acc)]`` modulo 2^64, in place (sign is +1 or -1)."""
    if sign not in (1, -1):
        raise SecAggError(f"a mask is added with sign +1 or -1, got {sign}")
    if acc.dtype != U64 or acc.ndim != 1:
        raise SecAggError("masks are added to flat uint64 vectors")
    if offset < 0:
        raise SecAggError(f"a mask offset cannot be negative, got {offset}")
    stream = _stream(seed, offset // _WORDS_PER_BLOCK)
    skip = offset % _WORDS_PER_BLOCK
    if skip:
        stream.update(bytes(8 * skip))  # into the block the slice starts in
    words = np.empty(_CHUNK, dtype=U64)
    raw = words.view(np.uint8)
    op = np.add if sign > 0 else np.subtract
    for start in range(0, acc.shape[0], _CHUNK):
        n = min(_CHUNK, acc.shape[0] - start)
        stream.update_into(_ZEROS[: 8 * n], raw[: 8 * n])
        part = acc[start : start + n]
        op(part, words[:n], out=part)
