"""Ingest a secure round's signed records and close its phases, checking everything with the protocol.

Workers hold no state between calls: each call rebuilds the aggregator of ``chorus_mq.secagg``
from what Redis stores (only ever what passed these same checks), feeds it the new message or
closes the phase, and writes the outcome through ``SecAggRounds``' fenced scripts. A hostile
record is :class:`PeerMisbehaved` naming the client and is never stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from ..errors import PeerMisbehaved, SecAggError
from ..names import ScriptStatus, SecAggClose, SecAggPhase
from ..secagg import wire
from ..secagg.encoding import U64, Encoded
from ..secagg.messages import Advertise, MaskedInput
from ..secagg.params import SecAggParams
from ..secagg.server import SecAggResult, SecAggServer
from .protocol import Reply
from .secagg import NEXT_PHASE, SecAggRounds

#: reads a client's masked input from the store (its reference checked: key, sha256)
LoadMasked = Callable[[wire.MaskedRef], Encoded]

_ORDER = (SecAggPhase.ADVERTISE, SecAggPhase.SHARE, SecAggPhase.MASKED_INPUT, SecAggPhase.UNMASK)


def _placeholder(params: SecAggParams) -> Encoded:
    # the right dtype and shape without the memory: enough for every check but the final sum
    return np.broadcast_to(np.zeros(1, dtype=U64), (params.length,))


def replay(rounds: SecAggRounds, r: int, params: SecAggParams, load: LoadMasked | None = None) -> SecAggServer:
    """An aggregator holding every stored message of round ``r`` up to its current phase (that phase open)."""
    state = rounds.state(r)
    if state is None:
        raise SecAggError(f"round {r} has no secure aggregation")
    # done: every stored unmask response, as when the phase closed (a commit that died after it re-sums)
    upto = SecAggPhase.UNMASK if state.phase is SecAggPhase.DONE else state.phase
    if upto not in _ORDER:
        raise SecAggError(f"round {r}'s secure aggregation is {state.phase}")
    server = SecAggServer(params)
    k = params.neighbour_count
    for phase in _ORDER:
        stored = rounds.submissions(r, phase)
        for c, payload in stored.items():
            if phase is SecAggPhase.ADVERTISE:
                server.receive_advert(wire.parse_advertise(c, payload))
            elif phase is SecAggPhase.SHARE:
                server.receive_shares(wire.parse_share(c, payload, k))
            elif phase is SecAggPhase.MASKED_INPUT:
                ref = wire.parse_masked(c, payload, k)
                vector = load(ref) if load is not None else _placeholder(params)
                server.receive_masked(MaskedInput(c, vector, ref.masked_with, ref.refused))
            else:
                server.receive_unmask(wire.parse_unmask(c, payload, k))
        if phase == upto:
            return server
        closer = {
            SecAggPhase.ADVERTISE: server.close_advertise,
            SecAggPhase.SHARE: server.close_share,
            SecAggPhase.MASKED_INPUT: server.close_masked,
        }[phase]
        closer()
        if phase is SecAggPhase.MASKED_INPUT and tuple(sorted(server.survivors)) != state.survivors:
            raise SecAggError(f"round {r}'s stored survivors differ from what its stored messages give")
    return server


def ingest(
    rounds: SecAggRounds,
    params: SecAggParams,
    record: wire.PhaseRecord,
    secret: str | None,
    *,
    load: LoadMasked | None = None,
    now: float | None = None,
) -> Reply:
    """Verify and check one client's record, then store it (see ``lua/secagg_submit.lua`` for the replies).

    ``secret``: the client's registered secret (None: not registered). ``load`` reads the client's
    masked input for the masked-input phase (its length and type are checked before it is stored).
    """
    c = record.client_id
    if secret is None or not record.signature_valid(secret):
        raise PeerMisbehaved(c, "the secure-aggregation record is unsigned or its signature does not verify")
    if record.federation != rounds.federation or record.round != params.round:
        raise PeerMisbehaved(c, f"the record is for {record.federation} round {record.round}, not this round")
    state = rounds.state(params.round)
    if state is None or state.phase != record.phase or rounds.has_submitted(params.round, record.phase, c):
        # nothing to check it against (or a redelivered record): the script answers no_round/stale/duplicate
        return rounds.submit(params.round, record.phase, c, {}, now=now)
    server = replay(rounds, params.round, params)
    k = params.neighbour_count
    payload = dict(record.payload)
    if record.phase is SecAggPhase.ADVERTISE:
        server.receive_advert(wire.parse_advertise(c, payload))
    elif record.phase is SecAggPhase.SHARE:
        server.receive_shares(wire.parse_share(c, payload, k))
    elif record.phase is SecAggPhase.MASKED_INPUT:
        ref = wire.parse_masked(c, payload, k)
        vector = load(ref) if load is not None else _placeholder(params)
        server.receive_masked(MaskedInput(c, vector, ref.masked_with, ref.refused))
    else:
        server.receive_unmask(wire.parse_unmask(c, payload, k))
    return rounds.submit(params.round, record.phase, c, payload, now=now)


def advance(
    rounds: SecAggRounds,
    params: SecAggParams,
    mode: str,
    *,
    load: LoadMasked | None = None,
    now: float | None = None,
) -> tuple[Reply, SecAggResult | None]:
    """Close the round's current phase (a :class:`SecAggClose` mode): compute who goes on and what each must read,
    and write it in one fenced transition. Closing the unmask phase checks that every mask left in the sum can be
    removed (the shares reconstruct); with ``load`` (reads the masked inputs) it also unmasks the sum and returns
    it. Too few clients left, or shares that do not reconstruct, abort the secure aggregation, except in mode
    ``enough`` (the unmask phase before every survivor answered), which then closes nothing (``not_due``)."""
    r = params.round
    state = rounds.state(r)
    if state is None or state.phase not in NEXT_PHASE:
        raise SecAggError(f"round {r} has no open secure-aggregation phase")
    phase = state.phase
    server = replay(rounds, r, params, load if phase is SecAggPhase.UNMASK else None)
    result: SecAggResult | None = None
    deliveries: dict[str, dict[str, str]] = {}
    members: list[str] | None = None
    try:
        if phase is SecAggPhase.ADVERTISE:
            routed = server.close_advertise()
            deliveries = {
                c: {f"advert:{p}": json.dumps(wire.advertise_payload(a)) for p, a in theirs.items()}
                for c, theirs in routed.items()
            }
        elif phase is SecAggPhase.SHARE:
            inbox = server.close_share()
            deliveries = {c: {f"share:{s}": wire.b64(blob) for s, blob in got.items()} for c, got in inbox.items()}
        elif phase is SecAggPhase.MASKED_INPUT:
            members = sorted(server.close_masked().survivors)
        else:
            if mode == SecAggClose.QUORUM and len(server.responses) < len(server.survivors):
                return rounds.close(r, phase, state.epoch, mode, now=now), None
            try:
                if mode == SecAggClose.ENOUGH and len(server.responses) < params.threshold:
                    raise SecAggError("fewer than T responses")
                if load is None:
                    # the workers' close: the masks can be removed (else abort); the sum is the shards' work
                    # (workers/secure_sum.py), each reconstructing the same seeds from what is stored here
                    server.unmask_seeds()
                else:
                    result = server.finish()
            except SecAggError:
                if mode != SecAggClose.ENOUGH:
                    raise
                # not yet: more responses may come before the deadline, which then decides (or aborts)
                return Reply(ScriptStatus.NOT_DUE, len(server.responses), state.epoch, ""), None
            members = sorted(server.responses)
    except SecAggError as exc:
        return rounds.close(r, phase, state.epoch, "abort", reason=str(exc), now=now), None
    reply = rounds.close(r, phase, state.epoch, mode, members=members, deliveries=deliveries, now=now)
    return reply, (result if reply.status == "ok" else None)


def unmask_suffices(rounds: SecAggRounds, params: SecAggParams) -> bool:
    """Is round ``params.round`` in its unmask phase with stored responses that already reconstruct every mask left
    in the sum (each survivor's self-mask seed, each dropped neighbour's mask key)? Then the phase may close
    ``enough`` before every survivor answered. Replays what Redis stores, as the close does; no masked input is read.

    Closing early reveals nothing more: the request (which share of which peer each survivor reveals, the survivors
    fixed when the masked-input phase closed) is the same whenever the phase closes; an early close only leaves
    some survivors' answers to it unsent. A response stored between this replay and the close stays stored and
    is replayed with the rest (more verified shares of the same seeds: the same sum)."""
    state = rounds.state(params.round)
    if state is None or state.phase is not SecAggPhase.UNMASK:
        return False
    if rounds.count(params.round, SecAggPhase.UNMASK) < state.threshold:
        return False  # cheap: no replay before T responses are in
    server = replay(rounds, params.round, params)
    if len(server.responses) < params.threshold:
        return False
    try:
        server.unmask_seeds()
    except SecAggError:
        return False
    return True


def adverts_of(delivered: dict[str, str]) -> dict[str, Advertise]:
    """The neighbours' advertisements a client reads from its delivery hash."""
    out = {}
    for field, value in delivered.items():
        if field.startswith("advert:"):
            peer = field[len("advert:") :]
            out[peer] = wire.parse_advertise(peer, json.loads(value))
    return out


def shares_of(delivered: dict[str, str]) -> dict[str, bytes]:
    """The sealed shares a client reads from its delivery hash (sender -> ciphertext)."""
    import base64

    return {f[len("share:") :]: base64.b64decode(v) for f, v in delivered.items() if f.startswith("share:")}
