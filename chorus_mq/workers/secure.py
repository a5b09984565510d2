"""Secure rounds in the workers: open the phases, ingest phase records, close phases, publish the unmasked sum.

A secure federation's round opens like any round (Lua); the beat's sweep (or any worker, the
first to call :func:`open_secure`) then fixes its cohort (the round's draw, else every active
client), the clients' weights and the masked vector's layout, and opens the advertise phase.
Phase records arrive through the clients' inboxes like delta records; the pump hands records of
kind ``secagg`` to :func:`handle_record`. A phase closes when every member sent (``fired``) or at
its deadline (the sweep). When the unmask phase closes the workers hold the sum of the
survivors' weighted inputs, never one input: :func:`publish` turns it into the round's adapter
(the frozen factor the round started from, and sum / total weight for the trained factor),
writes it as one shard and its manifest (naming ``summed`` and ``dropped``), and finalizes the
round under the epoch of the fenced ``secagg_fire`` transition. Every step is idempotent: a
worker that dies anywhere is repeated by the next sweep with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotFound, ObjectExists, ObjectMissing, PeerMisbehaved, SecAggError
from ..layout import accepted_key, manifest_key, masked_input_key, shard_key
from ..manifest import ClientEntry, Manifest, ShardEntry
from ..names import SHARD_FORMAT, RoundStatus, SecAggPhase, Task
from ..results import fetch_manifest
from ..secagg import wire
from ..secagg.encoding import Encoded
from ..secagg.params import SecAggParams, default_threshold
from ..secagg.public import RoundPublic, graph_seed
from ..secagg.server import SecAggResult
from ..secagg.stored import parse_masked
from ..secagg.vector import MaskedLayout
from ..state.clients import ClientRegistry
from ..state.inbox import Inbox, InboxEntry
from ..state.protocol import Reply
from ..state.secagg import SecAggRounds
from ..state.secagg_flow import advance, ingest, replay
from ..strategy import strategy_spec
from .dispatch import Dispatcher
from .lease import Heartbeat
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
    (the round is not open, or fewer than max(3, quorum) clients are active)."""
    config = rt.state.config(federation)
    info = rt.state.round(federation, r)
    if info.state != RoundStatus.OPEN:
        return None
    rounds = rounds_of(rt, federation)
    if rounds.state(r) is not None:
        return None
    registry = ClientRegistry(rt.redis, federation)
    cohort = sorted(info.selected) if info.selected else registry.active()
    if len(cohort) < max(3, config.quorum):
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
    """Published before any input: the operator's registered weight or dataset size (the policy), else equal."""
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
    return policy_weights(claims, config.weights, registered=registered, cap=1.0)


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
        advance_round(rt, federation, record.round, "quorum", dispatch)
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
    """Close round ``r``'s current phase (``quorum`` or ``deadline``). The unmask phase's close (the sum, then the
    publish) is the aggregate workers' task, never the pump's or the beat's."""
    state = rounds_of(rt, federation).state(r)
    if state is None:
        return "no_round"
    if state.phase is SecAggPhase.UNMASK:
        dispatch.send(Task.SECURE_UNMASK, federation, r, mode)
        return "dispatched"
    pub = public(rt, federation, r)
    if pub is None:
        return "no_round"
    params = pub.params(federation, r)
    reply, _ = advance(rounds_of(rt, federation), params, mode, now=now)
    if reply.status == "aborted":
        log.warning("round %s/%s: secure aggregation aborted: %s", federation, r, reply.detail)
    return reply.status


def unmask_and_publish(rt: Runtime, federation: str, r: int, mode: str, *, now: float | None = None) -> str:
    """The aggregate task: close the unmask phase (``quorum`` or ``deadline``), take the sum, publish. Idempotent:
    a phase another run closed is ``stale`` here, and a done round is published (again, with the same bytes)."""
    pub = public(rt, federation, r)
    if pub is None:
        return "no_round"
    params = pub.params(federation, r)
    rounds = rounds_of(rt, federation)
    state = rounds.state(r)
    result = None
    if state is not None and state.phase is SecAggPhase.UNMASK:
        reply, result = advance(rounds, params, mode, load=stored_loader(rt, federation, params), now=now)
        if reply.status == "aborted":
            log.warning("round %s/%s: secure aggregation aborted: %s", federation, r, reply.detail)
            return reply.status
        if reply.status == "not_due":
            return reply.status
    return publish(rt, federation, r, result)


def publish(rt: Runtime, federation: str, r: int, result: SecAggResult | None = None) -> str:
    """Fire round ``r`` (its secure aggregation done), write its adapter and manifest, finalize. Idempotent."""
    rounds = rounds_of(rt, federation)
    state = rounds.state(r)
    if state is None or state.phase is not SecAggPhase.DONE:
        return "not_done"
    info = rt.state.round(federation, r)
    if info.state == RoundStatus.COMPLETE:
        return "already"
    if info.state == RoundStatus.OPEN:
        fired = rounds.fire_round(r, state.epoch, rt.settings.aggregation_lease)
        if fired.status not in ("fired", "noop"):
            return fired.status
        info = rt.state.round(federation, r)
    if info.state != RoundStatus.AGGREGATING:
        return str(info.state)
    epoch = info.epoch
    pub = public(rt, federation, r)
    assert pub is not None
    params = pub.params(federation, r)
    key = manifest_key(federation, r)
    try:
        raw = rt.store.get_bytes(key)
    except ObjectMissing:
        with Heartbeat(rt, federation, r, epoch):  # the lease sweep does not send the publish again meanwhile
            raw = _write_manifest(rt, federation, r, epoch, pub, params, rounds, result)
    sha = hashlib.sha256(raw).hexdigest()
    manifest = Manifest.from_json(raw)
    secure = manifest.secure or {}
    reply = rt.state.finalize(
        federation,
        r,
        epoch,
        key,
        sha,
        {"clients": list(secure.get("summed", [])), "secure": secure},
    )
    return reply.status


def _write_manifest(
    rt: Runtime,
    federation: str,
    r: int,
    epoch: int,
    pub: RoundPublic,
    params: SecAggParams,
    rounds: SecAggRounds,
    result: SecAggResult | None,
) -> bytes:
    import torch

    from ..adapters import write_safetensors

    started = time.perf_counter()

    load = stored_loader(rt, federation, params)
    if result is None:  # a worker died after the unmask closed: every stored response, as at that close
        result = replay(rounds, r, params, load).finish()
    total_weight = math.fsum(pub.weights[c] for c in result.summed)
    total = result.total
    dp: dict[str, Any] | None = None
    if pub.noise_multiplier:
        from ..aggregation.dp import noise_generator
        from ..secagg.dp import noise_sum

        config = rt.state.config(federation)
        sigma = pub.sigma()
        # secret but deterministic per round: a re-run of this publish releases the same noise
        total = noise_sum(total, sigma, noise_generator(rt.state.noise_key(federation), federation, r, "secagg"))
        dp = {
            "noise_multiplier": pub.noise_multiplier,
            "clip_norm": pub.clip_norm,
            "delta": config.dp_delta,
            "sigma": sigma,
            "clients": len(pub.cohort),
        }
    trained = pub.layout.unflatten(total / total_weight)
    start_manifest, _ = fetch_manifest(rt.state, rt.store, federation, pub.start)
    items = sorted([*rt.state.modules(federation), *rt.state.extras(federation)])
    published = previous_global(rt, federation, pub.start, items)
    tensors: dict[str, torch.Tensor] = {}
    for m, mod in published.modules.items():
        tensors[f"{m}.lora_A.weight"] = mod.A.to(torch.float32)
        tensors[f"{m}.lora_B.weight"] = mod.B.to(torch.float32)
    for k, t in published.extras.items():
        tensors[k] = t.to(torch.float32)
    for k, v in trained.items():
        tensors[k] = torch.from_numpy(np.ascontiguousarray(v)).to(torch.float32)
    names = sorted({*published.modules, *published.extras})
    masked_refs = {
        c: wire.parse_masked(c, p, params.neighbour_count)
        for c, p in rounds.submissions(r, SecAggPhase.MASKED_INPUT).items()
    }
    with tempfile.TemporaryDirectory(dir=rt.spool) as tmp:
        local = Path(tmp) / "shard.safetensors"
        sha = write_safetensors(local, tensors, {"format": SHARD_FORMAT})
        skey = shard_key(federation, r, 0, "adapter", sha)
        try:
            rt.store.put_file(skey, local, write_once=True)
        except ObjectExists:
            pass
        size = local.stat().st_size
    from ..manifest import ObjectRef

    manifest = Manifest(
        federation=federation,
        round=r,
        epoch=epoch,
        strategy=start_manifest.strategy,
        base_model=start_manifest.base_model,
        adapter_config=start_manifest.adapter_config,
        clients=tuple(
            ClientEntry(c, masked_refs[c].sha256, None, pub.weights[c] / total_weight) for c in result.summed
        ),
        shards=(ShardEntry(0, names[0], names[-1], len(names), ObjectRef(skey, sha, size), None),),
        selected=pub.cohort,
        dp=dp,
        modules=len(published.modules),
        adapter_bytes=size,
        timings={"math": time.perf_counter() - started},
        secure={
            "summed": list(result.summed),
            "dropped": {c: str(p) for c, p in sorted(result.dropped.items())},
            "rejected": dict(sorted(result.rejected.items())),
            "weights": dict(pub.weights),
            "trainable": str(pub.trainable),
            "neighbours": pub.neighbours,
            "threshold": pub.threshold,
        },
    )
    raw = manifest.to_json()
    mkey = manifest_key(federation, r)
    try:
        rt.store.put_bytes(mkey, raw, write_once=True)
    except ObjectExists:
        raw = rt.store.get_bytes(mkey)  # a concurrent publish won: adopt its bytes
    return raw


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
        # the unmask closed and its task died before firing the round: publish again. Once fired, the round's
        # lease covers it: the lease sweep sends the task again when the lease runs out (workers/sweep.py)
        if rt.state.round(federation, r).state == RoundStatus.OPEN:
            dispatch.send(Task.SECURE_UNMASK, federation, r, "deadline")
            return "publishing"
        return "done"
    if state.phase is SecAggPhase.ABORTED:
        return "aborted"
    if now >= state.deadline:
        return advance_round(rt, federation, r, "deadline", dispatch, now=now)
    return "open"
