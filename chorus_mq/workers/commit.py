"""Commit a round: the manifest (write-once, the commit marker) and the fenced finalize.

Runs once every shard is done. The manifest lists each shard's objects with their hashes and
the global adapter's PEFT config; finalize is a compare-and-set on the round's epoch, and its
sha256 goes to Redis with it, so readers verify the manifest before trusting anything it names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

from ..adapters import LoraSpec
from ..adapters.spec import default_targets, fit_spec
from ..errors import ObjectExists, ObjectMissing, UnknownRound
from ..layout import manifest_key
from ..manifest import ClientEntry, Manifest, ShardEntry
from ..names import RoundStatus, ScriptStatus, ServerOptimizer, Task
from ..state import FederationConfig, RoundInfo
from .dispatch import Dispatcher
from .drift import client_entries, reported_eval, round_cosines
from .flush import manifest_fields
from .metrics import METRICS
from .previous import round_frame
from .round_plan import Plan
from .runtime import Runtime
from .server_step import collect_states
from .shard import ShardResult
from .sweep import request_compaction

log = logging.getLogger(__name__)


def commit_round(rt: Runtime, federation: str, r: int, epoch: int, dispatch: Dispatcher) -> str:
    """Write the manifest and finalize round ``r`` under ``epoch``. Idempotent; returns the outcome."""
    started = time.perf_counter()
    info = rt.state.round(federation, r)
    if info.state == RoundStatus.COMPLETE:
        return "already"
    if info.state != RoundStatus.AGGREGATING or info.epoch != epoch:
        return "stale"
    config = rt.state.config(federation)
    key = manifest_key(federation, r)
    try:
        raw = rt.store.get_bytes(key)  # an earlier commit wrote it and died before finalizing
    except ObjectMissing:
        raw = None
    if raw is None:
        manifest = build_manifest(rt, federation, info, config, started)
        raw = manifest.to_json()
        try:
            rt.store.put_bytes(key, raw, write_once=True)
        except ObjectExists:
            raw = rt.store.get_bytes(key)  # a concurrent commit won; adopt its manifest
    manifest = Manifest.from_json(raw)
    sha = hashlib.sha256(raw).hexdigest()
    summary = {
        "clients": [c.client_id for c in manifest.clients],
        "excluded": manifest.excluded,
        "strategy": manifest.strategy,
        "shards": len(manifest.shards),
        "seconds": manifest.timings.get("quorum_to_commit"),
    }
    cosines = {c.client_id: c.cosine for c in manifest.clients if c.cosine is not None}
    if cosines:  # (Lua's cjson writes an empty object back as a list)
        summary["cosine"] = cosines
    outcome = rt.state.finalize(federation, r, epoch, key, sha, summary)
    log.info("round %s/%s epoch %s finalize: %s", federation, r, epoch, outcome.status)
    if outcome.status == ScriptStatus.OK:
        METRICS.rounds.labels(state="complete").inc()
        if info.agg_started:
            METRICS.round_seconds.observe(max(0.0, time.time() - info.agg_started))
        METRICS.phase_seconds.labels(phase="commit").observe(time.perf_counter() - started)
        rt.state.forget_round_work(federation, r)  # the manifest now holds the plan and the shard results
        if config.checkpoint_every and r % config.checkpoint_every == 0:
            request_compaction(rt, dispatch, federation, r)
        if config.buffered:
            next_flush(rt, dispatch, federation, r)
        if config.server_opt != ServerOptimizer.NONE:
            try:  # only this round's optimiser state is read again (by the next); the sweep retries the rest
                collect_states(rt, federation)
            except Exception as exc:
                log.warning("round %s/%s: older server optimiser states not collected yet: %s", federation, r, exc)
    return outcome.status


def build_manifest(
    rt: Runtime, federation: str, info: RoundInfo, config: FederationConfig, commit_started: float
) -> Manifest:
    """Round ``info``'s manifest from its plan and shard results (``info``: the round as the commit read it,
    aggregating under its epoch; its selection is fixed while that epoch holds)."""
    r, epoch, agg_started = info.round, info.epoch, info.agg_started
    raw_plan = rt.state.plan(federation, r)
    if raw_plan is None:
        raise ObjectMissing(f"round {r} of {federation!r} has no plan")
    plan = Plan.from_json(raw_plan)
    results = {k: ShardResult.from_json(v) for k, v in rt.state.shards(federation, r).items()}
    records = rt.state.deltas(federation, r)
    shards = []
    out: dict[str, tuple[int, float]] = {}
    timings = {"fetch": 0.0, "math": 0.0, "write": 0.0}
    for k in range(len(plan.shards)):
        res = results[k]
        items = plan.shard_items(k)
        shards.append(
            ShardEntry(
                index=k,
                first=items[0],
                last=items[-1],
                items=len(items),
                adapter=res.adapter,
                residual=res.residual,
                variate=res.variate,
                opt_state=res.opt_state,
            )
        )
        out.update(res.out)
        for phase in timings:
            timings[phase] += res.seconds.get(phase, 0.0)
    timings = {p: round(v, 4) for p, v in timings.items()}
    walls = [res.seconds["shard"] for res in results.values() if "shard" in res.seconds]
    if walls:  # the shard tasks' wall time summed: what the round's length beyond it is not parallel over shards
        timings["shards"] = round(sum(walls), 4)
    timings["commit"] = round(time.perf_counter() - commit_started, 4)
    if agg_started:
        timings["quorum_to_commit"] = round(max(0.0, time.time() - agg_started), 4)
    return Manifest(
        federation=federation,
        round=r,
        epoch=epoch,
        strategy=str(config.strategy),
        base_model=config.base_model,
        adapter_config=adapter_config(plan.template, out, config, plan.extras),
        clients=with_bases(
            client_entries(records, plan.weights, round_cosines(results[k].drift for k in range(len(plan.shards)))),
            tuple(records),
            plan,
        ),
        shards=tuple(shards),
        excluded=plan.excluded,
        clipped=plan.clip,
        dp=_dp(config),
        selected=info.selected,
        modules=len(out),
        adapter_bytes=sum(res.adapter_bytes for res in results.values()),
        residual_bytes=sum(res.residual_bytes for res in results.values()),
        timings=timings,
        variate_clipped={key: f for res in results.values() for key, f in sorted(res.variate_clipped.items())},
        global_eval=reported_eval(records),
        server_opt=_server_opt(config, plan),
        buffered=manifest_fields(plan, config),
        # linear strategies: the shards hold the trained factor (and the head); the frozen ones are referred to
        # where they were last written rather than written again (the start: the latest complete round)
        frame=round_frame(rt, federation, config.strategy, r, rt.state.latest_complete(federation)),
    )


def adapter_config(
    template: dict[str, Any], out: dict[str, tuple[int, float]], config: FederationConfig, extras: tuple[str, ...]
) -> dict[str, Any]:
    """The global adapter's PEFT config: the template's layout and task, per-module ranks and scalings
    (``fit_spec``), the federation's base model, and modules_to_save only when the round has extras."""
    spec = LoraSpec.from_peft_config(template)
    # a regex stays; a list becomes the modules' own names (the union over clients may exceed one client's list)
    targets = spec.target_modules if isinstance(spec.target_modules, str) and spec.target_modules else None
    fitted = fit_spec(
        spec,
        {m: rank for m, (rank, _) in out.items()},
        {m: s for m, (_, s) in out.items()},
        targets=targets if targets is not None else default_targets(out),
    )
    return fitted.replace(
        base_model=config.base_model, modules_to_save=spec.modules_to_save if extras else ()
    ).to_peft_config()


def with_bases(entries: tuple[ClientEntry, ...], terms: tuple[str, ...], plan: Plan) -> tuple[ClientEntry, ...]:
    """A flush's entries (one per term, in ``terms``' order) with their delta's base version and staleness
    (a synchronous round's as they are)."""
    if not plan.flush_lr:
        return entries
    return tuple(
        dataclasses.replace(e, base_version=plan.bases.get(term), staleness=plan.staleness.get(term))
        for e, term in zip(entries, terms, strict=True)
    )


def next_flush(rt: Runtime, dispatch: Dispatcher, federation: str, r: int) -> None:
    """Re-send the round task of the flush after ``r`` when it fired while ``r`` aggregated (it waits for ``r``
    with backoff; this starts it now). Idempotent: the plan is set once."""
    try:
        info = rt.state.round(federation, r + 1)
    except UnknownRound:
        return
    if info.state == RoundStatus.AGGREGATING and rt.state.plan(federation, r + 1) is None:
        dispatch.send(Task.ROUND, federation, r + 1, info.epoch)


def _server_opt(config: FederationConfig, plan: Plan) -> dict[str, Any] | None:
    settings = config.server_opt_settings()
    return {**settings, "previous_round": plan.previous} if settings else None


def _dp(config: FederationConfig) -> dict[str, Any] | None:
    if not config.dp_noise_multiplier:
        return None
    return {
        "noise_multiplier": config.dp_noise_multiplier,
        "clip_norm": config.clip_norm,
        "delta": config.dp_delta,
        "quorum": config.quorum,
    }
