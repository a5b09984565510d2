"""The client's side of a secure round, a state machine with one method per phase.

advertise -> share_keys -> masked_input -> unmask. The input is only given at masked_input,
so nothing sent before it can depend on it. The unmask rule that keeps an input private even
from a lying aggregator: for every peer, reveal either the share of its self-mask seed (the
peer's masked input is summed) or the share of its mask key (it dropped), never both, across
every request of the round; a request that would break this is refused whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from ..errors import SecAggError, UnmaskRefused
from ..names import SecAggPhase, ShareKind
from . import keys, shamir
from .keys import KEY_BYTES, SEED_BYTES
from .masking import pairwise_seed, parse_bundle, seed_commitment
from .messages import Advertise, MaskedInput, ShareKeys, UnmaskRequest, UnmaskResponse
from .params import SecAggParams
from .prg import add_mask
from .sealing import open_sealed, seal


class SecAggClient:
    """One client in one secure round. Keys and seeds live only in this object."""

    def __init__(self, params: SecAggParams, client_id: str):
        if client_id not in params.cohort:
            raise SecAggError(f"client {client_id!r} is not in the round's secure-aggregation cohort")
        self.params = params
        self.client_id = client_id
        self.x = params.x_of(client_id)
        self.neighbours = params.graph[client_id]
        self.phase = SecAggPhase.ADVERTISE
        self._cipher: keys.KeyPair | None = None
        self._mask: keys.KeyPair | None = None
        self._seed = b""
        self._peers: dict[str, Advertise] = {}
        #: neighbours left out, and why (a bad advertisement or a share that did not open)
        self.refused: dict[str, str] = {}
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}
        self._revealed: dict[str, ShareKind] = {}

    def state(self) -> dict[str, Any]:
        """Everything this client must keep between phases, as JSON-able data (a restarted client resumes
        from it; it holds private keys and seeds: the caller keeps it private)."""

        def pair(kp: keys.KeyPair | None) -> list[str] | None:
            return None if kp is None else [kp.private.hex(), kp.public.hex()]

        return {
            "client": self.client_id,
            "phase": self.phase.value,
            "cipher": pair(self._cipher),
            "mask": pair(self._mask),
            "seed": self._seed.hex(),
            "peers": {c: [a.cipher_public.hex(), a.mask_public.hex()] for c, a in self._peers.items()},
            "refused": dict(self.refused),
            "held": {c: [s.to_bytes().hex(), k.to_bytes().hex()] for c, (s, k) in self._held.items()},
            "revealed": {c: kind.value for c, kind in self._revealed.items()},
        }

    @classmethod
    def restore(cls, params: SecAggParams, state: Mapping[str, Any]) -> SecAggClient:
        """The client :meth:`state` saved, in the round ``params`` describe."""

        def pair(raw: list[str] | None) -> keys.KeyPair | None:
            return None if raw is None else keys.KeyPair(bytes.fromhex(raw[0]), bytes.fromhex(raw[1]))

        client = cls(params, str(state["client"]))
        client.phase = SecAggPhase(state["phase"])
        client._cipher, client._mask = pair(state["cipher"]), pair(state["mask"])
        client._seed = bytes.fromhex(state["seed"])
        client._peers = {
            c: Advertise(c, bytes.fromhex(cipher), bytes.fromhex(mask)) for c, (cipher, mask) in state["peers"].items()
        }
        client.refused = dict(state["refused"])
        share = shamir.Share.from_bytes
        client._held = {
            c: (share(bytes.fromhex(s), SEED_BYTES), share(bytes.fromhex(k), KEY_BYTES))
            for c, (s, k) in state["held"].items()
        }
        client._revealed = {c: ShareKind(kind) for c, kind in state["revealed"].items()}
        return client

    def _expect(self, phase: SecAggPhase) -> None:
        if self.phase != phase:
            raise SecAggError(f"client {self.client_id!r} is in phase {self.phase}, not {phase}")

    def advertise(self) -> Advertise:
        """Phase 1: two fresh X25519 key pairs; their public halves go to the aggregator."""
        self._expect(SecAggPhase.ADVERTISE)
        self._cipher, self._mask = keys.generate(), keys.generate()
        self.phase = SecAggPhase.SHARE
        return Advertise(self.client_id, self._cipher.public, self._mask.public)

    def share_keys(self, adverts: Mapping[str, Advertise]) -> ShareKeys:
        """Phase 2: Shamir-share the self-mask seed and the mask key among the live neighbours, sealed to each."""
        self._expect(SecAggPhase.SHARE)
        assert self._cipher is not None and self._mask is not None
        p = self.params
        sealed: dict[str, bytes] = {}
        self._seed = os.urandom(SEED_BYTES)
        live = sorted(c for c in self.neighbours if c in adverts and self._check_advert(c, adverts[c]))
        if len(live) < p.threshold:
            self.phase = SecAggPhase.ABORTED
            raise SecAggError(
                f"client {self.client_id!r} has {len(live)} live neighbours, fewer than the threshold {p.threshold}"
            )
        xs = [p.x_of(c) for c in live]
        seed_shares = shamir.split(self._seed, p.threshold, xs)
        key_shares = shamir.split(self._mask.private, p.threshold, xs)
        for c, s, k in zip(live, seed_shares, key_shares, strict=True):
            try:
                sealed[c] = seal(
                    s.to_bytes() + k.to_bytes(),
                    private=self._cipher.private,
                    peer_public=adverts[c].cipher_public,
                    federation=p.federation,
                    round_=p.round,
                    sender=self.client_id,
                    recipient=c,
                )
            except SecAggError as exc:  # a low-order public key: leave that neighbour out
                self.refused[c] = str(exc)
                continue
            self._peers[c] = adverts[c]
        if len(sealed) < p.threshold:
            self.phase = SecAggPhase.ABORTED
            raise SecAggError(f"client {self.client_id!r} could seal shares for only {len(sealed)} neighbours")
        self.phase = SecAggPhase.MASKED_INPUT
        return ShareKeys(self.client_id, sealed, seed_commitment(p, self.client_id, self._seed))

    def _check_advert(self, peer: str, advert: Advertise) -> bool:
        if advert.client != peer:
            self.refused[peer] = f"its advertisement is labelled {advert.client!r}"
            return False
        if len(advert.cipher_public) != KEY_BYTES or len(advert.mask_public) != KEY_BYTES:
            self.refused[peer] = f"its public keys are not {KEY_BYTES} bytes each"
            return False
        return True

    def masked_input(self, inbound: Mapping[str, bytes], x: npt.ArrayLike) -> MaskedInput:
        """Phase 3: open the neighbours' shares, then send the encoded input plus every mask.

        ``x`` is this client's input already scaled by its published weight. A neighbour whose
        share does not open is not masked with and is named in ``refused``.
        """
        self._expect(SecAggPhase.MASKED_INPUT)
        assert self._cipher is not None and self._mask is not None
        p = self.params
        y = p.encoding.encode(x)
        if y.shape[0] != p.length:
            raise SecAggError(
                f"client {self.client_id!r}'s input has {y.shape[0]} elements, the round expects {p.length}"
            )
        refused: dict[str, str] = {}
        for peer, blob in sorted(inbound.items()):
            if peer not in self._peers:
                refused[peer] = "not a neighbour this client shared with"
                continue
            try:
                plain = open_sealed(
                    blob,
                    private=self._cipher.private,
                    peer_public=self._peers[peer].cipher_public,
                    federation=p.federation,
                    round_=p.round,
                    sender=peer,
                    recipient=self.client_id,
                )
                self._held[peer] = parse_bundle(plain, self.x)
            except SecAggError as exc:
                refused[peer] = str(exc)
        self.refused.update(refused)
        add_mask(y, self._seed, +1)
        for peer in sorted(self._held):
            seed = pairwise_seed(p, self._mask.private, self._peers[peer].mask_public, self.client_id, peer)
            add_mask(y, seed, p.mask_sign(self.client_id, peer))
        self.phase = SecAggPhase.UNMASK
        return MaskedInput(self.client_id, y, frozenset(self._held), refused)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: reveal, per held peer, the self-seed share (a survivor) or the mask-key share (dropped)."""
        self._expect(SecAggPhase.UNMASK)
        p = self.params
        survivors = request.survivors
        if self.client_id not in survivors:
            raise UnmaskRefused(f"client {self.client_id!r} sent its masked input but the request counts it as dropped")
        if not survivors <= set(p.cohort):
            raise UnmaskRefused("the unmask request names clients outside the cohort")
        if len(survivors) < p.threshold:
            raise UnmaskRefused(
                f"the unmask request sums {len(survivors)} inputs, fewer than the threshold {p.threshold}"
            )
        kinds = {peer: ShareKind.SELF_SEED if peer in survivors else ShareKind.MASK_KEY for peer in self._held}
        for peer, kind in kinds.items():
            before = self._revealed.get(peer)
            if before is not None and before != kind:
                raise UnmaskRefused(
                    f"client {self.client_id!r} already revealed its {before} share of {peer!r}; revealing the {kind} "
                    f"share of {peer!r} too would expose that client's input"
                )
        self._revealed.update(kinds)
        shares = {
            peer: (kind, (self._held[peer][0] if kind == ShareKind.SELF_SEED else self._held[peer][1]).to_bytes())
            for peer, kind in kinds.items()
        }
        return UnmaskResponse(self.client_id, shares)
