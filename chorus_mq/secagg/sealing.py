"""AEAD of the shares one client sends another: ChaCha20-Poly1305 under an X25519-agreed key.

The associated data binds a ciphertext to (federation, round, sender, recipient): a ciphertext
replayed into another round, or relabelled as coming from someone else, fails to open.
Layout: 12-byte random nonce || ciphertext || 16-byte tag.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import SecAggError
from .keys import agree, context

NONCE_BYTES = 12
TAG_BYTES = 16


def sealed_size(plaintext_len: int) -> int:
    return NONCE_BYTES + plaintext_len + TAG_BYTES


def _key(private: bytes, peer_public: bytes, federation: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return agree(private, peer_public, context("share-key", federation, round_, lo, hi))


def _ad(federation: str, round_: int, sender: str, recipient: str) -> bytes:
    return context("share", federation, round_, sender, recipient)


def seal(
    plaintext: bytes, *, private: bytes, peer_public: bytes, federation: str, round_: int, sender: str, recipient: str
) -> bytes:
    """Encrypt ``plaintext`` from ``sender`` (its cipher private key) to ``recipient`` (its cipher public key)."""
    key = _key(private, peer_public, federation, round_, sender, recipient)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _ad(federation, round_, sender, recipient))


def open_sealed(
    sealed: bytes, *, private: bytes, peer_public: bytes, federation: str, round_: int, sender: str, recipient: str
) -> bytes:
    """Decrypt what ``sender`` sealed for ``recipient``; anything tampered or misaddressed is :class:`SecAggError`."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"a sealed share is at least {NONCE_BYTES + TAG_BYTES} bytes, got {len(sealed)}")
    key = _key(private, peer_public, federation, round_, sender, recipient)
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _ad(federation, round_, sender, recipient)
        )
    except InvalidTag:
        raise SecAggError(
            f"the share from {sender!r} to {recipient!r} does not decrypt (tampered or misaddressed)"
        ) from None
