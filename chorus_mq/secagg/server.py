"""The aggregator's side of a secure round: collect each phase, fix its cohort, unmask only the sum.

Each ``receive_*`` checks one client's message against everything public; a malformed one is
refused with :class:`PeerMisbehaved` naming the client and changes nothing else, so the round
goes on without it. Each ``close_*`` fixes who is in for the next phase (called at quorum or
deadline by whoever drives the round) and raises :class:`SecAggError` when too few are left.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from ..errors import PeerMisbehaved, SecAggError
from ..names import SecAggPhase, ShareKind
from . import keys, shamir
from .encoding import U64, Encoded
from .keys import KEY_BYTES, SEED_BYTES
from .masking import COMMITMENT_BYTES, SEALED_BYTES, SHARE_BYTES, pairwise_seed, seed_commitment
from .messages import Advertise, MaskedInput, ShareKeys, UnmaskRequest, UnmaskResponse
from .params import SecAggParams
from .prg import add_mask


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum and who it is the sum of."""

    total: npt.NDArray[np.float64]
    encoded: Encoded
    #: the clients whose inputs are in ``total`` (sorted)
    summed: tuple[str, ...]
    #: every cohort client not summed -> the phase it dropped (or was excluded) in
    dropped: Mapping[str, SecAggPhase] = field(default_factory=dict)
    #: clients whose messages were refused -> why
    rejected: Mapping[str, str] = field(default_factory=dict)


def _seed_check(params: SecAggParams, client: str, commitment: bytes) -> Callable[[bytes], bool]:
    return lambda seed: seed_commitment(params, client, seed) == commitment


def _key_check(public: bytes) -> Callable[[bytes], bool]:
    return lambda private: keys.public_of(private) == public


class SecAggServer:
    """The aggregator of one secure round (honest-but-curious: it sees every message below)."""

    def __init__(self, params: SecAggParams):
        self.params = params
        self.phase = SecAggPhase.ADVERTISE
        self.adverts: dict[str, Advertise] = {}
        self.bundles: dict[str, ShareKeys] = {}
        self.masked: dict[str, MaskedInput] = {}
        self.responses: dict[str, UnmaskResponse] = {}
        self.rejected: dict[str, str] = {}
        self.dropped: dict[str, SecAggPhase] = {}
        self.survivors: frozenset[str] = frozenset()

    # -- helpers ---------------------------------------------------------------------------------
    def _reject(self, client: str, reason: str) -> NoReturn:
        self.rejected.setdefault(client, reason)
        raise PeerMisbehaved(client, reason)

    def _expect(self, phase: SecAggPhase, what: str) -> None:
        if self.phase != phase:
            raise SecAggError(f"the round is in phase {self.phase}: {what} is not accepted now")

    def _drop(self, clients: set[str] | frozenset[str], phase: SecAggPhase) -> None:
        for c in clients:
            self.dropped.setdefault(c, phase)

    def _need(self, n: int, what: str) -> None:
        if n < self.params.threshold:
            self.phase = SecAggPhase.ABORTED
            raise SecAggError(
                f"only {n} clients {what}, fewer than the threshold {self.params.threshold}: round aborted"
            )

    def expected_peers(self, client: str) -> frozenset[str]:
        """The peers ``client`` must mask with: shares went both ways between them."""
        mine = self.bundles[client].sealed
        return frozenset(p for p in mine if p in self.bundles and client in self.bundles[p].sealed)

    # -- phase 1 ---------------------------------------------------------------------------------
    def receive_advert(self, msg: Advertise) -> None:
        self._expect(SecAggPhase.ADVERTISE, "an advertisement")
        c = msg.client
        if c not in self.params.cohort:
            self._reject(c, "not in the round's cohort")
        if c in self.adverts:
            self._reject(c, "advertised twice")
        if len(msg.cipher_public) != KEY_BYTES or len(msg.mask_public) != KEY_BYTES:
            self._reject(c, f"public keys must be {KEY_BYTES} bytes each")
        if msg.cipher_public == msg.mask_public:
            self._reject(c, "the cipher and mask public keys must differ")
        self.adverts[c] = msg

    def close_advertise(self) -> dict[str, dict[str, Advertise]]:
        """Fix U1; per live client, its live neighbours' advertisements (what to forward to it)."""
        self._expect(SecAggPhase.ADVERTISE, "closing the advertise phase")
        live = set(self.adverts)
        self._drop(set(self.params.cohort) - live, SecAggPhase.ADVERTISE)
        self._need(len(live), "advertised keys")
        self.phase = SecAggPhase.SHARE
        g = self.params.graph
        return {c: {p: self.adverts[p] for p in sorted(g[c] & live)} for c in sorted(live)}

    # -- phase 2 ---------------------------------------------------------------------------------
    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect(SecAggPhase.SHARE, "a share bundle")
        c = msg.client
        if c not in self.adverts:
            self._reject(c, "sent shares without having advertised keys")
        if c in self.bundles:
            self._reject(c, "sent shares twice")
        allowed = self.params.graph[c] & set(self.adverts)
        stray = sorted(set(msg.sealed) - allowed)
        if stray:
            self._reject(c, f"sent shares to clients that are not its live neighbours: {stray}")
        if len(msg.sealed) < self.params.threshold:
            self._reject(c, f"sent {len(msg.sealed)} shares, fewer than the threshold {self.params.threshold}")
        for to, blob in msg.sealed.items():
            if len(blob) != SEALED_BYTES:
                self._reject(c, f"its sealed share for {to!r} is {len(blob)} bytes, not {SEALED_BYTES}")
        if len(msg.seed_commitment) != COMMITMENT_BYTES:
            self._reject(c, f"its seed commitment is not {COMMITMENT_BYTES} bytes")
        self.bundles[c] = msg

    def close_share(self) -> dict[str, dict[str, bytes]]:
        """Fix U2; per client in U2, the sealed shares addressed to it (sender -> ciphertext)."""
        self._expect(SecAggPhase.SHARE, "closing the share phase")
        live = set(self.bundles)
        self._drop(set(self.adverts) - live, SecAggPhase.SHARE)
        self._need(len(live), "shared their keys")
        self.phase = SecAggPhase.MASKED_INPUT
        inbox: dict[str, dict[str, bytes]] = {c: {} for c in sorted(live)}
        for sender in sorted(live):
            for to, blob in self.bundles[sender].sealed.items():
                if to in inbox:
                    inbox[to][sender] = blob
        return inbox

    # -- phase 3 ---------------------------------------------------------------------------------
    def receive_masked(self, msg: MaskedInput) -> None:
        self._expect(SecAggPhase.MASKED_INPUT, "a masked input")
        c = msg.client
        if c not in self.bundles:
            self._reject(c, "sent a masked input without having shared its keys")
        if c in self.masked:
            self._reject(c, "sent a masked input twice")
        y = msg.masked
        if not isinstance(y, np.ndarray) or y.dtype != U64 or y.shape != (self.params.length,):
            shape = getattr(y, "shape", None)
            self._reject(c, f"its masked input must be {self.params.length} uint64 words, got {shape}")
        extra = sorted(msg.masked_with - self.expected_peers(c))
        if extra:
            self._reject(c, f"claims to have masked with {extra}, which it did not exchange shares with")
        self.masked[c] = msg

    def close_masked(self) -> UnmaskRequest:
        """Fix U3, leave out every client a survivor could not pair with, and ask for the shares."""
        self._expect(SecAggPhase.MASKED_INPUT, "closing the masked-input phase")
        sent = set(self.masked)
        self._drop(set(self.bundles) - sent, SecAggPhase.MASKED_INPUT)
        excluded: set[str] = set()
        for u in sorted(sent):
            for p in sorted((self.expected_peers(u) & sent) - self.masked[u].masked_with):
                # u could not open p's share, so u's masks and p's do not cancel: p's input is left out
                excluded.add(p)
                reason = self.masked[u].refused.get(p, "no reason given")
                self.rejected.setdefault(p, f"neighbour {u!r} could not open its share: {reason}")
        self._drop(excluded, SecAggPhase.MASKED_INPUT)
        self.survivors = frozenset(sent - excluded)
        self._need(len(self.survivors), "sent usable masked inputs")
        self.phase = SecAggPhase.UNMASK
        return UnmaskRequest(self.survivors)

    # -- phase 4 ---------------------------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._expect(SecAggPhase.UNMASK, "an unmask response")
        c = msg.client
        if c not in self.survivors:
            self._reject(c, "sent an unmask response but its input is not summed")
        if c in self.responses:
            self._reject(c, "sent an unmask response twice")
        held = self.masked[c].masked_with
        x = self.params.x_of(c)
        for peer, (kind, raw) in msg.shares.items():
            if peer not in held:
                self._reject(c, f"revealed a share of {peer!r}, which it did not pair with")
            want = ShareKind.SELF_SEED if peer in self.survivors else ShareKind.MASK_KEY
            if kind != want:
                self._reject(c, f"revealed a {kind} share of {peer!r} where the {want} share was asked")
            if len(raw) != SHARE_BYTES:
                self._reject(c, f"its share of {peer!r} is {len(raw)} bytes, not {SHARE_BYTES}")
            try:
                share = shamir.Share.from_bytes(raw, SEED_BYTES)
            except SecAggError as exc:
                self._reject(c, f"its share of {peer!r} is malformed: {exc}")
            if share.x != x:
                self._reject(c, f"its share of {peer!r} is at x = {share.x}, not its own {x}")
        self.responses[c] = msg

    def _shares_of(self, peer: str, kind: ShareKind) -> list[shamir.Share]:
        out = []
        for c in sorted(self.responses):
            got = self.responses[c].shares.get(peer)
            if got is not None and got[0] == kind:
                out.append(shamir.Share.from_bytes(got[1], SEED_BYTES))
        return out

    def unmask_seeds(self) -> list[tuple[bytes, int]]:
        """Every mask left in the survivors' sum, as (seed, sign): add each to the sum to unmask it.

        Reconstructs the survivors' self-mask seeds and the dropped clients' mask keys (checked against
        their commitments and advertised public keys, routing around wrong shares). A sharded unmask
        hands these to each shard (``unmask_slice``), so the reconstruction runs once.
        """
        self._expect(SecAggPhase.UNMASK, "unmasking")
        p = self.params
        t = p.threshold
        out: list[tuple[bytes, int]] = []
        try:
            for w in sorted(self.survivors):
                seed = shamir.reconstruct_verified(
                    self._shares_of(w, ShareKind.SELF_SEED),
                    t,
                    SEED_BYTES,
                    _seed_check(p, w, self.bundles[w].seed_commitment),
                )
                out.append((seed, -1))
            lost = {d for w in self.survivors for d in self.masked[w].masked_with if d not in self.survivors}
            for d in sorted(lost):
                key = shamir.reconstruct_verified(
                    self._shares_of(d, ShareKind.MASK_KEY),
                    t,
                    KEY_BYTES,
                    _key_check(self.adverts[d].mask_public),
                )
                for w in sorted(self.survivors):
                    if d in self.masked[w].masked_with:
                        out.append((pairwise_seed(p, key, self.adverts[w].mask_public, w, d), -p.mask_sign(w, d)))
        except SecAggError as exc:
            self.phase = SecAggPhase.ABORTED
            raise SecAggError(f"cannot unmask the sum: {exc}") from None
        return out

    def finish(self) -> SecAggResult:
        """Reconstruct the survivors' self seeds and the dropped clients' mask keys; unmask the sum."""
        seeds = self.unmask_seeds()
        p = self.params
        total = unmask_slice([self.masked[w].masked for w in sorted(self.survivors)], seeds, 0)
        self.phase = SecAggPhase.DONE
        summed = tuple(sorted(self.survivors))
        return SecAggResult(
            total=p.encoding.decode_sum(total, len(summed)),
            encoded=total,
            summed=summed,
            dropped=dict(self.dropped),
            rejected=dict(self.rejected),
        )


def unmask_slice(masked: Sequence[Encoded], seeds: Sequence[tuple[bytes, int]], offset: int) -> Encoded:
    """Elements ``[offset, offset + n)`` of the unmasked sum, from the same slice of each survivor's masked
    input and the round's :meth:`SecAggServer.unmask_seeds` (what one shard of a sharded unmask computes)."""
    if not masked:
        raise SecAggError("nothing to unmask")
    n = masked[0].shape[0]
    total = np.zeros(n, dtype=U64)
    for y in masked:
        if y.dtype != U64 or y.shape != (n,):
            raise SecAggError("every masked slice must be the same length of uint64 words")
        np.add(total, y, out=total)
    for seed, sign in seeds:
        add_mask(total, seed, sign, offset)
    return total
