"""Plan a round once its quorum fired: who counts with which weight, and how the modules are sharded.

The first round task of a round computes the plan and stores it with SET NX, so every later
run (redelivery, reclaim after a worker died) uses the same plan and produces the same bytes.
Then it enqueues every shard that is not done yet (or the commit, when all are).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..adapters.delta import embedded_spec
from ..adapters.header import header_from_prefix
from ..aggregation import policy_weights
from ..aggregation.weights import client_claims, split_among_terms
from ..errors import AggregationError, NotFound, StateCorrupt
from ..manifest import ObjectRef
from ..names import RoundStatus, ServerOptimizer, Task
from ..results import fetch_manifest
from ..state import FederationConfig
from ..state.clients import ClientRegistry
from ..state.rounds import DeltaRecord
from ..strategy import strategy_spec
from .declared import Declared, declared_model, present_modules
from .dispatch import Dispatcher
from .lease import Heartbeat
from .round_plan import Plan
from .runtime import Runtime

log = logging.getLogger(__name__)

#: fp32 bytes per element, for balancing shards by bytes (exact dtypes do not matter for balance)
_ITEM_BYTES = 4


def plan_round(rt: Runtime, federation: str, r: int, epoch: int, dispatch: Dispatcher) -> str:
    """Make (or load) the round's plan and enqueue what is left to do. Idempotent."""
    info = rt.state.round(federation, r)
    if info.state != RoundStatus.AGGREGATING or info.epoch != epoch:
        log.info("skip planning %s/%s epoch %s: state %s epoch %s", federation, r, epoch, info.state, info.epoch)
        return "stale"
    stored = rt.state.plan(federation, r)
    if stored is None:
        if rt.state.config(federation).buffered:
            from .flush_order import wait_for_previous

            wait_for_previous(rt, federation, r, epoch)  # a flush moves the version before it: raises to retry
        with Heartbeat(rt, federation, r, epoch):
            try:
                plan = make_plan(rt, federation, r)
            except AggregationError as exc:
                outcome = rt.state.fail(federation, r, epoch, f"{type(exc).__name__}: {exc}")
                log.error("round %s/%s cannot be planned: %s (%s)", federation, r, exc, outcome.status)
                return "failed"
        stored = rt.state.set_plan(federation, r, plan.to_json())
    plan = Plan.from_json(stored)
    return send_missing_shards(rt, dispatch, federation, r, epoch, len(plan.shards), Task.SHARD, Task.COMMIT)


def send_missing_shards(
    rt: Runtime, dispatch: Dispatcher, federation: str, r: int, epoch: int, shards: int, shard: Task, commit: Task
) -> str:
    """Send the ``shard`` task of every shard not yet recorded, or ``commit`` once all are (a rerun sends only
    what is missing)."""
    done = rt.state.shards(federation, r)
    missing = [k for k in range(shards) if k not in done]
    for k in missing:
        dispatch.send(shard, federation, r, epoch, k)
    if not missing:
        dispatch.send(commit, federation, r, epoch)
    return f"dispatched {len(missing)}/{shards} shards"


def make_plan(rt: Runtime, federation: str, r: int) -> Plan:
    config = rt.state.config(federation)
    records = rt.state.deltas(federation, r)  # sorted by client id: a fixed order, deterministic sums
    if not records:
        raise AggregationError(f"round {r} has no deltas")
    declared = declared_model(rt, federation, config)
    present = {c: present_modules(declared.modules, rec.present) for c, rec in records.items()}
    weights = _weights(rt, federation, config, records)
    excluded: dict[str, str] = {}
    clip: dict[str, float] = {}
    # a buffered flush bounds each delta's update against its own base version instead (workers/flush.py); the
    # rest of screening is refused in buffered mode (FederationConfig)
    if config.dp_noise_multiplier and strategy_spec(config.strategy).linear and not config.buffered:
        # the release is the trained factor: each client's step of it is clipped, not its product (dp_linear)
        from .flush import dp_clips, trained_step_norms

        trains = strategy_spec(config.strategy).trainable(r)
        assert trains is not None  # a frozen shared frame always names what its clients train
        start = rt.state.latest_complete(federation) or 0
        norms = trained_step_norms(rt, federation, records, dict.fromkeys(records, start), start, trains)
        clip = dp_clips(config, norms, _head_steps(rt, federation, config, records))
    elif config.screening and not config.buffered:
        from .screening import screen_round

        screening = screen_round(rt, records, weights, config)
        weights, excluded, clip = screening.weights, screening.excluded, screening.clip
        if not weights:
            raise AggregationError(f"screening excluded every client: {excluded}")
        if config.dp_noise_multiplier:  # one clip factor over each client's adapter update and head step
            from .flush import dp_clips

            kept_records = {c: records[c] for c in weights}
            clip = dp_clips(config, screening.norms_sq, _head_steps(rt, federation, config, kept_records))
    kept = sorted(weights)
    flush: dict[str, Any] = {}
    if config.buffered:
        from .flush import flush_fields

        weights, flush = flush_fields(rt, federation, config, {c: records[c] for c in kept}, weights)
        clip = flush.pop("clip")
    elif config.relative_clip and not config.dp_noise_multiplier:
        # on by default: no client counts for more than k x the round's median (docs/DESIGN.md section 1);
        # never under DP, whose sensitivity bound must not depend on the other clients' updates
        from .screening import relative_clip

        for key, factor in relative_clip(rt, {c: records[c] for c in kept}, kept, config.relative_clip).items():
            clip[key] = clip.get(key, 1.0) * factor
    modules = sorted(set().union(*(present[c] for c in kept)))
    items = tuple(sorted([*modules, *declared.extras]))
    template = _template(rt, records[kept[0]])
    heads: tuple[ObjectRef, ...] = ()
    if declared.heads_local:
        heads, template = _initial_heads(rt, federation, declared, template)
    holders = {c: records[c] for c in kept}
    sizes = [_item_bytes(item, declared, holders, present, carried=bool(heads)) for item in items]
    shard_count = min(rt.settings.max_shards, len(items), max(1, math.ceil(sum(sizes) / rt.settings.shard_bytes)))
    return Plan(
        clients=tuple(kept),
        weights={c: weights[c] for c in kept},
        items=items,
        extras=declared.extras,
        shards=balanced_ranges(sizes, shard_count),
        strategy=config.strategy,
        missing=config.missing_modules,
        out_rank=config.out_rank,
        template=template,
        excluded=excluded,
        clip=clip,
        dp=bool(config.dp_noise_multiplier),
        variate_fraction=_variate_fraction(rt, federation, kept) if config.scaffold else 0.0,
        heads=heads,
        # fixed here, so every shard run of this round reads the same previous round, whatever completes later
        previous=flush.pop("previous", None) if flush else _previous(rt, federation, config),
        **flush,  # a buffered flush's base versions, staleness and η (workers/flush.py)
    )


def _head_steps(
    rt: Runtime, federation: str, config: FederationConfig, records: Mapping[str, DeltaRecord]
) -> dict[str, dict[str, float]]:
    """DP in a synchronous round: each client's ``||h_i − h_start||^2`` per head tensor, against the head the round
    starts from (the latest complete round's); none under ``--personal-heads``."""
    from .flush import head_step_norms, published_heads

    heads = published_heads(rt, federation, config)
    start = rt.state.latest_complete(federation)
    return head_step_norms(rt, federation, records, dict.fromkeys(records, start), heads)


def _previous(rt: Runtime, federation: str, config: FederationConfig) -> int | None:
    """The complete round a server optimiser steps from: the latest one when the round is planned."""
    return rt.state.latest_complete(federation) if config.server_opt != ServerOptimizer.NONE else None


def _variate_fraction(rt: Runtime, federation: str, kept: Sequence[str]) -> float:
    """|S|/N for SCAFFOLD's server step: the round's kept clients over the federation's active ones, fixed in
    the plan so that a rerun after a client joined or left computes the same variate."""
    population = len(set(ClientRegistry(rt.redis, federation).active()) | set(kept))
    return len(kept) / population


def _weights(
    rt: Runtime, federation: str, config: FederationConfig, records: Mapping[str, DeltaRecord]
) -> dict[str, float]:
    if config.dp_noise_multiplier:
        # the mechanism fixes public weights 1/quorum itself; these only order the clients
        return {c: 1.0 / len(records) for c in records}
    # the policy and its cap weigh clients; a buffered client with several deltas here (its terms) shares its
    # weight evenly among them (aggregation.weights.split_among_terms)
    owners = {term: rec.client_id for term, rec in records.items()}
    registry = ClientRegistry(rt.redis, federation)
    registered: dict[str, float] = {}
    for client in sorted(set(owners.values())):
        try:
            info = registry.record(client)
        except NotFound:  # development mode: an unregistered, unsigned client
            continue
        value = info.weight if info.weight is not None else info.dataset_size
        if value is not None:
            registered[client] = float(value)
    claims = client_claims({t: rec.dataset_size for t, rec in records.items()}, owners)
    weights = policy_weights(claims, config.weights, registered=registered, cap=config.max_client_weight)
    return split_among_terms(weights, owners)


def _item_bytes(
    item: str,
    declared: Declared,
    records: Mapping[str, DeltaRecord],
    present: Mapping[str, frozenset[str]],
    *,
    carried: bool = False,
) -> int:
    if item in declared.decl.extras:  # one copy of round 0's head when it is carried, else one per client
        return math.prod(declared.decl.extras[item]) * _ITEM_BYTES * (1 if carried else len(records))
    d_out, d_in = declared.decl.modules[item]
    total = 0
    for client, rec in records.items():
        if item in present[client]:
            rank = rec.rank if rec.rank is not None else max(rec.ranks or (1,))
            total += rank * (d_out + d_in) * _ITEM_BYTES
    return total


def balanced_ranges(sizes: Sequence[int], parts: int) -> tuple[tuple[int, int], ...]:
    """Split ``sizes`` into ``parts`` contiguous non-empty ranges whose sums are about equal."""
    n = len(sizes)
    parts = max(1, min(parts, n))
    prefix = list(itertools.accumulate(max(0, s) for s in sizes))
    total = prefix[-1] if prefix else 0
    cuts = [0]
    for j in range(1, parts):
        target = total * j / parts
        # the boundary whose prefix sum is closest to the target, leaving one item for every later part
        above = bisect.bisect_left(prefix, target) + 1
        i = min((c for c in (above - 1, above) if c >= 1), key=lambda c: abs(prefix[c - 1] - target))
        i = min(max(i, cuts[-1] + 1), n - (parts - j))
        cuts.append(i)
    cuts.append(n)
    return tuple((cuts[j], cuts[j + 1]) for j in range(parts))


def _initial_heads(
    rt: Runtime, federation: str, declared: Declared, template: dict[str, Any]
) -> tuple[tuple[ObjectRef, ...], dict[str, Any]]:
    """Where round 0 keeps the task head (its shard objects whose name range holds a head tensor), and the
    template with round 0's modules_to_save (the clients' deltas carry none)."""
    manifest, _sha = fetch_manifest(rt.state, rt.store, federation, 0)
    heads = tuple(
        shard.adapter for shard in manifest.shards if any(shard.first <= name <= shard.last for name in declared.extras)
    )
    saved = manifest.adapter_config.get("modules_to_save")
    if not heads or not saved:
        raise AggregationError(
            "--personal-heads: round 0 holds no task head to publish (the federation was created without one)"
        )
    return heads, {**template, "modules_to_save": saved}


def _template(rt: Runtime, record: DeltaRecord) -> dict[str, Any]:
    """The PEFT config embedded in an accepted delta (its layout, task type and modules_to_save).

    The header was validated at ingest, and the accepted copy is out of the client's reach.
    """
    n = int.from_bytes(rt.store.get_range(record.key, 0, 8), "little")
    prefix = rt.store.get_range(record.key, 0, 8 + n)
    spec = embedded_spec(header_from_prefix(prefix, max_header_bytes=rt.settings.max_header_bytes))
    if spec is None:  # ingest embeds the config in every accepted copy
        raise StateCorrupt(f"accepted delta {record.key} carries no adapter_config")
    return spec.to_peft_config()
