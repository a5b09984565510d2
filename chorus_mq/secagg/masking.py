"""What both sides derive the same way: pairwise seeds, seed commitments, a share bundle's layout."""

from __future__ import annotations

import hashlib

from ..errors import SecAggError
from . import shamir
from .keys import KEY_BYTES, SEED_BYTES, agree, context
from .params import SecAggParams
from .sealing import sealed_size

#: bytes of one serialised Shamir share of a 32-byte secret (seed or X25519 private key)
SHARE_BYTES = shamir.share_size(SEED_BYTES)
#: a share bundle's plaintext: the self-seed share, then the mask-key share
BUNDLE_BYTES = 2 * SHARE_BYTES
SEALED_BYTES = sealed_size(BUNDLE_BYTES)
COMMITMENT_BYTES = 32
assert KEY_BYTES == SEED_BYTES  # both secrets share one share size


def pairwise_seed(params: SecAggParams, mask_private: bytes, peer_mask_public: bytes, a: str, b: str) -> bytes:
    """The seed of the mask clients ``a`` and ``b`` share (either side's private key, the other's public)."""
    lo, hi = sorted((a, b))
    return agree(mask_private, peer_mask_public, context("pair-mask", params.federation, params.round, lo, hi))


def seed_commitment(params: SecAggParams, client: str, seed: bytes) -> bytes:
    """SHA-256 over the seed and where it belongs (a 256-bit random seed stays hidden behind it)."""
    return hashlib.sha256(context("seed-commitment", params.federation, params.round, client) + seed).digest()


def parse_bundle(plaintext: bytes, expected_x: int) -> tuple[shamir.Share, shamir.Share]:
    """The (self-seed, mask-key) shares in an opened bundle, both at the recipient's x-coordinate."""
    if len(plaintext) != BUNDLE_BYTES:
        raise SecAggError(f"a share bundle is {BUNDLE_BYTES} bytes, got {len(plaintext)}")
    seed_share = shamir.Share.from_bytes(plaintext[:SHARE_BYTES], SEED_BYTES)
    key_share = shamir.Share.from_bytes(plaintext[SHARE_BYTES:], KEY_BYTES)
    if seed_share.x != expected_x or key_share.x != expected_x:
        raise SecAggError(f"the shares are for x = {seed_share.x}/{key_share.x}, not this client's {expected_x}")
    return seed_share, key_share
