"""X25519 key pairs and key agreement, every derived key bound to its purpose by HKDF's info.

Each client makes two fresh key pairs per round: a *cipher* pair (its shares are encrypted
under the key it agrees with each recipient) and a *mask* pair (the pairwise mask seed it
agrees with each neighbour; its private half is Shamir-shared so a dropout can be unmasked).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import SecAggError

KEY_BYTES = 32
SEED_BYTES = 32
_DOMAIN = b"chorus-secagg/1"
_RAW = serialization.Encoding.Raw


def context(*parts: str | int | bytes) -> bytes:
    """An unambiguous byte string of ``parts`` (each length-prefixed), for HKDF info and AEAD data."""
    out = bytearray(_DOMAIN)
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A raw X25519 key pair (32 bytes each). ``repr`` never shows the private half."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate() -> KeyPair:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return KeyPair(private, key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    """The public key of a raw private key (to check a reconstructed key against its advertisement)."""
    if len(private) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(private)}")
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both sides derive: HKDF-SHA256(X25519(private, peer_public), info).

    A malformed or low-order peer key (the shared secret would be all zeros) is :class:`SecAggError`.
    """
    if len(private) != KEY_BYTES or len(peer_public) != KEY_BYTES:
        raise SecAggError(f"X25519 keys are {KEY_BYTES} bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)
