"""What travels in each phase of a secure round (all of it is what the aggregator sees)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..names import ShareKind
from .encoding import Encoded


@dataclass(frozen=True)
class Advertise:
    """Phase 1 (advertise keys): a client's two fresh public keys for this round."""

    client: str
    cipher_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Phase 2 (share keys): the sealed shares of ``client``'s self-mask seed and mask key, per recipient.

    ``seed_commitment`` (SHA-256 of the seed, domain-separated) lets the aggregator tell a correct
    reconstruction from one poisoned by a wrong share.
    """

    client: str
    sealed: Mapping[str, bytes]
    seed_commitment: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Phase 3 (masked input): the encoded input plus every mask; ``masked_with`` the peers it paired with.

    ``refused`` names neighbours whose shares did not open, with why: the aggregator leaves them out.
    """

    client: str
    masked: Encoded
    masked_with: frozenset[str]
    refused: Mapping[str, str]


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4 (unmask): the clients whose masked inputs the aggregator sums; everyone else counts as dropped."""

    survivors: frozenset[str]


@dataclass(frozen=True)
class UnmaskResponse:
    """One client's revealed shares: per peer, exactly one kind (the self seed or the mask key)."""

    client: str
    shares: Mapping[str, tuple[ShareKind, bytes]]
