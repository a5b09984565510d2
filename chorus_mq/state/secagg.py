"""A secure round's phases in Redis: who may submit, what each submitted, quorum/deadline transitions.

Every change is one Lua script (``lua/secagg_*.lua``, KEYS/ARGV in their headers), fenced by the
phase's epoch so two workers closing one phase change it once. Payloads are stored after the
protocol's checks (``chorus_mq.state.secagg_flow``), and what a client must read next (its
neighbours' public keys, the shares sealed to it) is written, in the same transition, to a hash
only that client's ACL user can read (``FederationKeys.secagg_to``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis

from ..errors import StateCorrupt
from ..names import SecAggClose, SecAggPhase
from .events import prelude_args
from .protocol import Reply, text, text_map
from .redis_keys import FederationKeys
from .scripts import Scripts

#: the phase that follows each phase clients submit in
NEXT_PHASE = {
    SecAggPhase.ADVERTISE: SecAggPhase.SHARE,
    SecAggPhase.SHARE: SecAggPhase.MASKED_INPUT,
    SecAggPhase.MASKED_INPUT: SecAggPhase.UNMASK,
    SecAggPhase.UNMASK: SecAggPhase.DONE,
}


@dataclass(frozen=True)
class SecAggState:
    """Round ``round``'s public secure-aggregation hash, typed."""

    round: int
    phase: SecAggPhase
    epoch: int
    deadline: float
    threshold: int
    cohort: int
    phase_seconds: float
    survivors: tuple[str, ...] = ()
    reason: str = ""

    @classmethod
    def from_hash(cls, r: int, h: Mapping[str, str]) -> SecAggState:
        try:
            return cls(
                round=r,
                phase=SecAggPhase(h["phase"]),
                epoch=int(h["epoch"]),
                deadline=float(h["deadline"]),
                threshold=int(h["threshold"]),
                cohort=int(h["cohort"]),
                phase_seconds=float(h["phase_seconds"]),
                survivors=tuple(json.loads(h.get("survivors", "[]"))),
                reason=h.get("reason", ""),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"round {r}'s secure-aggregation state is malformed: {exc}") from None


class SecAggRounds:
    """The secure-aggregation phases of one federation's rounds."""

    def __init__(self, redis: Redis, federation: str, *, scripts: Scripts | None = None, maxlen: int = 100_000):
        self.redis = redis
        self.keys = FederationKeys(federation)
        self.federation = self.keys.federation
        self.scripts = scripts or Scripts(redis)
        self.maxlen = maxlen

    def _prelude(self, r: int, now: float | None) -> list[Any]:
        return prelude_args(self.federation, r, self.maxlen, time.time() if now is None else now)

    def open(
        self,
        r: int,
        cohort: Sequence[str],
        threshold: int,
        phase_seconds: float,
        *,
        params: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Reply:
        """Fix round ``r``'s cohort and open its advertise phase (``created``; ``exists`` when done before).

        ``params``: the round's public parameters (JSON-able), stored and published with the phase."""
        k = self.keys
        return self.scripts.secagg_open(
            keys=[k.secagg(r), k.secagg_members(r, SecAggPhase.ADVERTISE), k.events],
            args=[
                *self._prelude(r, now),
                int(threshold),
                repr(float(phase_seconds)),
                json.dumps(sorted(cohort)),
                "" if params is None else json.dumps(dict(params), sort_keys=True),
            ],
        )

    def public_params(self, r: int) -> dict[str, Any] | None:
        """The public parameters stored when round ``r``'s secure aggregation opened (None: none)."""
        raw = self.redis.hget(self.keys.secagg(r), "params")
        if raw is None:
            return None
        try:
            out = json.loads(raw)
        except ValueError:
            raise StateCorrupt(f"round {r}'s secure-aggregation params are not JSON") from None
        if not isinstance(out, dict):
            raise StateCorrupt(f"round {r}'s secure-aggregation params are not an object")
        return out

    def fire_round(self, r: int, epoch: int, lease_s: float, *, now: float | None = None) -> Reply:
        """Move open round ``r`` to aggregating once its secure aggregation (at ``epoch``) is done
        (``lua/secagg_fire.lua``: fired | noop | not_done)."""
        k = self.keys
        now = time.time() if now is None else now
        return self.scripts.secagg_fire(
            keys=[
                *(k.meta, k.round(r), k.round(r + 1), k.events, k.deadlines, k.leases, k.clients, k.secrets),
                k.secagg(r),
            ],
            args=[*self._prelude(r, now), repr(now + lease_s), int(epoch)],
        )

    def state(self, r: int) -> SecAggState | None:
        raw = text_map(self.redis.hgetall(self.keys.secagg(r)))
        return SecAggState.from_hash(r, raw) if raw else None

    def submit(
        self, r: int, phase: SecAggPhase, client: str, payload: Mapping[str, Any], *, now: float | None = None
    ) -> Reply:
        """Store ``client``'s checked payload for ``phase`` (see ``lua/secagg_submit.lua`` for the replies)."""
        k = self.keys
        return self.scripts.secagg_submit(
            keys=[k.secagg(r), k.secagg_phase(r, phase), k.secagg_members(r, phase)],
            args=[*self._prelude(r, now), phase.value, client, json.dumps(dict(payload), sort_keys=True)],
        )

    def submissions(self, r: int, phase: SecAggPhase) -> dict[str, Any]:
        """client -> stored payload of ``phase``, sorted by client."""
        raw = text_map(self.redis.hgetall(self.keys.secagg_phase(r, phase)))
        try:
            return {c: json.loads(raw[c]) for c in sorted(raw)}
        except ValueError as exc:
            raise StateCorrupt(f"a stored {phase} payload of round {r} is not JSON: {exc}") from None

    def count(self, r: int, phase: SecAggPhase) -> int:
        """How many clients submitted in ``phase`` (one HLEN: nothing parsed)."""
        return int(self.redis.hlen(self.keys.secagg_phase(r, phase)))

    def has_submitted(self, r: int, phase: SecAggPhase, client: str) -> bool:
        return bool(self.redis.hexists(self.keys.secagg_phase(r, phase), client))

    def members(self, r: int, phase: SecAggPhase) -> set[str]:
        return {text(m) for m in self.redis.smembers(self.keys.secagg_members(r, phase))}

    def close(
        self,
        r: int,
        phase: SecAggPhase,
        epoch: int,
        mode: str,
        *,
        members: Sequence[str] | None = None,
        deliveries: Mapping[str, Mapping[str, str]] | None = None,
        reason: str = "",
        now: float | None = None,
    ) -> Reply:
        """Close ``phase`` (a :class:`SecAggClose` mode), fenced by ``epoch``; write ``deliveries`` (client -> fields)
        to each client's own hash in the same transition."""
        if mode not in SecAggClose.values():
            raise ValueError(f"close mode must be one of {', '.join(SecAggClose.values())}, got {mode!r}")
        k = self.keys
        targets = sorted(deliveries or {})
        nxt = NEXT_PHASE.get(phase, SecAggPhase.ABORTED)
        return self.scripts.secagg_close(
            keys=[
                k.secagg(r),
                k.secagg_phase(r, phase),
                k.secagg_members(r, phase),
                k.secagg_members(r, nxt),
                k.events,
                *(k.secagg_to(r, c) for c in targets),
            ],
            args=[
                *self._prelude(r, now),
                phase.value,
                int(epoch),
                mode,
                "" if members is None else json.dumps(sorted(members)),
                json.dumps([dict((deliveries or {})[c]) for c in targets]),
                nxt.value,
                reason,
            ],
        )

    def delivered(self, r: int, client: str) -> dict[str, str]:
        """What round ``r`` handed ``client`` (its neighbours' ``advert:<peer>``, the ``share:<peer>`` sealed to it)."""
        return text_map(self.redis.hgetall(self.keys.secagg_to(r, client)))
