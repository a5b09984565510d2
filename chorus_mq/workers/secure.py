"""Secure rounds in the workers: open the phases, ingest phase records, close phases, sweep.

A secure federation's round opens like any round (Lua); the beat's sweep (or any worker, the
first to call :func:`open_secure`) then fixes its cohort (the round's draw, else every active
client), the clients' weights and the masked vector's layout, and opens the advertise phase.
Phase records arrive through the clients' inboxes like delta records; the pump hands records of
kind ``secagg`` to :func:`handle_record`. A phase closes when every member sent (``fired``), the
unmask phase also as soon as the stored responses reconstruct every mask left in the sum (``enough``),
or at its deadline (the sweep). Closing the unmask phase is the aggregate workers' round task
(``chorus.secure_unmask``): it fires the round and unmasks only the sum, sharded like any round
(``workers/secure_sum.py``: plan, shards, manifest, fenced finalize). Every step is idempotent: a
worker that dies anywhere is repeated by the next sweep with the same bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import NotFound, ObjectExists, PeerMisbehaved, SecAggError
from ..layout import accepted_key, masked_input_key
from ..names import RoundStatus, SecAggClose, SecAggPhase, Task
from ..secagg import wire
from ..secagg.encoding import Encoded
from ..secagg.params import MIN_COHORT, SecAggParams, default_threshold
from ..secagg.public import RoundPublic, graph_seed
from ..secagg.stored import parse_masked
from ..secagg.vector import MaskedLayout
from ..state.clients import ClientRegistry
from ..state.inbox import Inbox, InboxEntry
from ..state.protocol import Reply
from ..state.secagg import SecAggRounds
from ..state.secagg_flow import advance, ingest, unmask_suffices
from ..strategy import strategy_spec
from .dispatch import Dispatcher
from .previous import previous_global
from .runtime import Runtime

log = logging.getLogger(__name__)


def rounds_of(rt: Runtime, federation: str) -> SecAggRounds:
    return SecAggRounds(rt.redis, federation, scripts=rt.state.scripts, maxlen=rt.settings.events_maxlen)


def public(rt: Runtime, federation: str, r: int) -> RoundPublic | None:
    raw = rounds_of(rt, federation).public_params(r)
    return None if raw is None else RoundPublic.from_dict(raw)


def open_secure(rt: Runtime, federation: str, r: int, *, now: float | None = None) -> Reply | None:
    """Fix round ``r``'s cohort and parameters and open its advertise phase; None while it cannot open yet
    (the round is not open, or fewer than max(MIN_COHORT, quorum) clients are active)."""
    config = rt.state.config(federation)
    info = rt.state.round(federation, r)
    if info.state != RoundStatus.OPEN:
        return None
    rounds = rounds_of(rt, federation)
    if rounds.state(r) is not None:
        return None
    registry = ClientRegistry(rt.redis, federation)
    cohort = sorted(info.selected) if info.selected else registry.active()
    if len(cohort) < max(MIN_COHORT, config.quorum):
        return None
    start = rt.state.latest_complete(federation)
    if start is None:
        raise SecAggError(f"secure federation {federation} has no published start (round 0) to mask against")
    trained = strategy_spec(config.strategy).trainable(r)
    if trained is None:  # config refuses non-linear strategies; a guard for a hand-edited meta hash
        raise SecAggError(f"strategy {config.strategy} trains no single factor: it cannot be masked")
    published = previous_global(rt, federation, start, [*rt.state.modules(federation), *rt.state.extras(federation)])
    layout = MaskedLayout.for_round(
        {m: (tuple(p.A.shape), tuple(p.B.shape)) for m, p in published.modules.items()},
        {k: tuple(t.shape) for k, t in published.extras.items()},
        trained,
    )
    seed = graph_seed(federation, r, cohort)
    probe = SecAggParams(
        federation=federation,
        round=r,
        cohort=tuple(cohort),
        length=layout.length,
        graph_seed=seed,
        neighbour_count=config.secagg_neighbours,
        threshold=config.secagg_threshold,
    )
    pub = RoundPublic(
        cohort=tuple(cohort),
        neighbours=probe.neighbour_count,
        threshold=probe.threshold or default_threshold(probe.neighbour_count),
        graph_seed=seed,
        weights=_weights(rt, federation, config, cohort),
        trainable=trained,
        layout=layout,
        start=start,
        clip_norm=config.clip_norm,
        noise_multiplier=config.dp_noise_multiplier,
    )
    return rounds.open(r, cohort, pub.threshold, float(config.secagg_phase_timeout), params=pub.to_dict(), now=now)


def _weights(rt: Runtime, federation: str, config: Any, cohort: list[str]) -> dict[str, float]:
    """Published before any input: the operator's registered weight or dataset size (the policy), else equal,
    capped at ``--max-client-weight`` over the cohort as a plain round caps its clients (a dropout then lifts the
    others' shares, which the cap cannot foresee)."""
    from ..aggregation import policy_weights

    registry = ClientRegistry(rt.redis, federation)
    registered: dict[str, float] = {}
    for c in cohort:
        try:
            info = registry.record(c)
        except NotFound:
            continue
        value = info.weight if info.weight is not None else info.dataset_size
        if value is not None:
            registered[c] = float(value)
    claims: dict[str, float | None] = {c: registered.get(c) for c in cohort}
    return policy_weights(claims, config.weights, registered=registered, cap=config.max_client_weight)


# -- records ---------------------------------------------------------------------------------------


def is_secagg(raw: str) -> bool:
    """Does an inbox record claim to be a secure-aggregation phase record (a JSON object whose ``kind`` is
    ``secagg``)? Anything else, junk included, goes the delta path and is judged there."""
    if '"secagg"' not in raw:
        return False
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("kind") == wire.KIND


def handle_record(rt: Runtime, inbox: Inbox, entry: InboxEntry, dispatch: Dispatcher) -> str:
    """Verify, check and store one phase record, retiring its inbox entry; a hostile one is rejected with
    its reason (``delta_rejected``, code ``secagg_peer``) and changes nothing. Returns the outcome."""
    assert entry.record is not None
    scripts = rt.state.scripts
    federation = entry.federation
    r = 0
    try:
        record = wire.PhaseRecord.parse(entry.record, rt.settings.max_inbox_record_bytes)
        r = record.round
        if entry.client is not None and record.client_id != entry.client:
            raise PeerMisbehaved(entry.client, f"its inbox carries a record signed as {record.client_id!r}")
        try:
            secret = ClientRegistry(rt.redis, federation).secret(record.client_id)
        except Exception as exc:  # revoked
            raise PeerMisbehaved(record.client_id, str(exc)) from None
        pub = public(rt, federation, record.round)
        if pub is None:
            raise PeerMisbehaved(record.client_id, f"round {record.round} has no open secure aggregation")
        params = pub.params(federation, record.round)
        reply = ingest(
            rounds_of(rt, federation),
            params,
            record,
            secret,
            load=lambda ref: _accept_masked(rt, federation, record.round, params, ref),
        )
    except PeerMisbehaved as exc:
        client = entry.client or exc.client
        event = {"client": client, "reason": str(exc), "code": exc.code, "round": r, "kind": wire.KIND}
        inbox.reject(scripts, entry.id, r, client, exc.code, event, maxlen=rt.settings.events_maxlen)
        return "rejected"
    inbox.ack_delete([entry.id])
    if reply.status == "fired":
        advance_round(rt, federation, record.round, SecAggClose.QUORUM, dispatch)
    elif (
        reply.status == "accepted"
        and record.phase is SecAggPhase.UNMASK
        and reply.n >= params.threshold
        and unmask_suffices(rounds_of(rt, federation), params)
    ):
        # not everyone answered, yet the responses in hand remove every mask: close now rather than at the
        # deadline (a survivor silent at unmask would otherwise hold the round for --secagg-phase-timeout)
        advance_round(rt, federation, record.round, SecAggClose.ENOUGH, dispatch)
        return "enough"
    return reply.status


def _accept_masked(rt: Runtime, federation: str, r: int, params: SecAggParams, ref: wire.MaskedRef) -> Encoded:
    """Read a client's masked input from its own prefix, check it, and keep a copy out of its reach."""
    if ref.key != masked_input_key(federation, ref.client, r, ref.sha256):
        raise PeerMisbehaved(ref.client, "its masked input must lie at its own secagg key for this round")
    limit = params.length * 8 + 4096
    size = rt.store.size(ref.key)
    if size is None:
        raise PeerMisbehaved(ref.client, f"its masked input {ref.key} is not in the store")
    if size > limit:
        raise PeerMisbehaved(ref.client, f"its masked input is {size} bytes, over the {limit} this round allows")
    raw = rt.store.get_bytes(ref.key)
    vector = parse_masked(ref.client, raw, ref.sha256, params.length)
    try:
        rt.store.put_bytes(accepted_key(federation, ref.client, ref.sha256), raw, write_once=True)
    except ObjectExists:
        pass  # content-addressed: a redelivered record
    return vector


# -- transitions -----------------------------------------------------------------------------------


def stored_loader(rt: Runtime, federation: str, params: SecAggParams) -> Callable[[wire.MaskedRef], Encoded]:
    """Reads a masked input from the workers' accepted copy, checked again (its hash, type and length)."""

    def load(ref: wire.MaskedRef) -> Encoded:
        raw = rt.store.get_bytes(accepted_key(federation, ref.client, ref.sha256))
        return parse_masked(ref.client, raw, ref.sha256, params.length)

    return load


def advance_round(
    rt: Runtime, federation: str, r: int, mode: str, dispatch: Dispatcher, *, now: float | None = None
) -> str:
    """Close round ``r``'s current phase (a :class:`SecAggClose` mode: ``quorum``, ``deadline``, or ``enough`` for the
    unmask phase). The unmask phase's close (then the sharded unmask and the publish) is the aggregate workers'
    round task, never the pump's or the beat's."""
    state = rounds_of(rt, federation).state(r)
    if state is None:
        return "no_round"
    if state.phase is SecAggPhase.UNMASK:
        dispatch.send(Task.SECURE_UNMASK, federation, r, str(mode))
        return "dispatched"
    pub = public(rt, federation, r)
    if pub is None:
        return "no_round"
    params = pub.params(federation, r)
    reply, _ = advance(rounds_of(rt, federation), params, mode, now=now)
    if reply.status == "aborted":
        log.warning("round %s/%s: secure aggregation aborted: %s", federation, r, reply.detail)
    return reply.status


# -- the sweep -------------------------------------------------------------------------------------


def sweep(rt: Runtime, federation: str, dispatch: Dispatcher, *, now: float | None = None) -> str:
    """One beat for a secure federation: open the current round's phases, close a phase past its deadline,
    publish a done round (a worker that died after the unmask closed). Returns what it did."""
    now = time.time() if now is None else now
    r = rt.state.current_round(federation)
    rounds = rounds_of(rt, federation)
    state = rounds.state(r)
    if state is None:
        opened = open_secure(rt, federation, r, now=now)
        return "opened" if opened is not None and opened.status == "created" else "waiting"
    if state.phase is SecAggPhase.DONE:
        # the unmask closed and its task died before firing the round: send the round task again. Once fired, the
        # round's lease covers it: the lease sweep sends it again when the lease runs out (workers/sweep.py)
        if rt.state.round(federation, r).state == RoundStatus.OPEN:
            dispatch.send(Task.SECURE_UNMASK, federation, r, "deadline")
            return "publishing"
        return "done"
    if state.phase is SecAggPhase.ABORTED:
        return "aborted"
    if now >= state.deadline:
        return advance_round(rt, federation, r, "deadline", dispatch, now=now)
    return "open"
