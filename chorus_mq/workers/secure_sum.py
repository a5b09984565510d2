"""A secure round's unmask, sharded like any round: close, fire, plan, shards, commit.

Once every survivor answered the unmask request, or the stored answers already reconstruct every mask left in
the sum (``enough``), or at the phase's deadline, the round task
(``chorus.secure_unmask``, :func:`plan_unmask`) closes the unmask phase (``secagg_close.lua``: only
after checking that the stored shares reconstruct every mask left in the sum), fires the round
(``secagg_fire.lua``: aggregating under a new epoch and lease), and stores a plan with SET NX:
who is summed, and the round's tensors split into contiguous shards by name. Each shard task
(:func:`run_secure_shard`) rebuilds the aggregator from what Redis stores, reconstructs the same
seeds (the survivors' self-mask seeds and the dropped clients' mask keys, never anything of a
live client's pairwise masks: ``SecAggServer.unmask_seeds``), reads its slice of each survivor's
masked input by range, and writes its tensors (the unmasked weighted mean of the trained factor and
the head; its manifest refers to where the frozen factors lie, ``Manifest.frame``) to a write-once,
content-addressed object; ``shard_done.lua`` records it once under the epoch, and the last one enqueues
the commit (:func:`commit_secure`): the manifest, write-once, then the fenced finalize. No step keeps anything in memory
between tasks and every output depends only on the stored state, so a worker that dies between any two
steps leaves work that the next run (the sweep re-sends the round task) finishes with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ObjectExists, ObjectMissing, SecAggError
from ..layout import accepted_key, manifest_key, shard_key
from ..manifest import ClientEntry, Manifest, ObjectRef, ShardEntry
from ..names import (
    SERVER_STATE_FORMAT,
    SHARD_FORMAT,
    RoundStatus,
    ScriptStatus,
    SecAggClose,
    SecAggPhase,
    ServerOptimizer,
    Task,
)
from ..results import fetch_manifest
from ..secagg import wire
from ..secagg.encoding import U64, Encoded
from ..secagg.public import RoundPublic
from ..secagg.server import unmask_slice
from ..secagg.stored import data_begin
from ..state import FederationConfig
from ..state.secagg_flow import advance, replay
from ..strategy import strategy_spec
from .dispatch import Dispatcher
from .lease import Heartbeat
from .plan import balanced_ranges, send_missing_shards
from .previous import previous_global, round_frame
from .runtime import Runtime
from .secure import public, rounds_of
from .server_step import collect_states
from .shard import ShardResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecurePlan:
    """Everything a secure round's shards and commit need, fixed once (stored as the round's plan)."""

    #: the clients whose masked inputs the sum holds (sorted), and each one's masked input (sha256)
    summed: tuple[str, ...]
    masked: dict[str, str]
    #: cohort clients not summed -> the phase they dropped in; clients refused -> why
    dropped: dict[str, str]
    rejected: dict[str, str]
    #: the round's modules and head tensors, sorted by name, and each one's tensor key in the masked layout
    items: tuple[str, ...]
    keys: dict[str, str]
    #: contiguous [start, end) ranges over ``items``
    shards: tuple[tuple[int, int], ...]

    def to_json(self) -> str:
        return json.dumps({"kind": "secure", **asdict(self)}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> SecurePlan:
        d = json.loads(raw)
        if d.get("kind") != "secure":
            raise SecAggError("the round's stored plan is not a secure round's")
        return cls(
            summed=tuple(d["summed"]),
            masked=dict(d["masked"]),
            dropped=dict(d["dropped"]),
            rejected=dict(d["rejected"]),
            items=tuple(d["items"]),
            keys=dict(d["keys"]),
            shards=tuple((int(a), int(b)) for a, b in d["shards"]),
        )

    def shard_items(self, k: int) -> tuple[str, ...]:
        start, end = self.shards[k]
        return self.items[start:end]

    @property
    def extras(self) -> tuple[str, ...]:
        """The head tensors (a module's layout key is ``<module>.<factor>.weight``, a head tensor's its own)."""
        return tuple(i for i in self.items if self.keys[i] == i)


# -- the round task ----------------------------------------------------------------------------------


def plan_unmask(
    rt: Runtime, federation: str, r: int, mode: str, dispatch: Dispatcher, *, now: float | None = None
) -> str:
    """Close round ``r``'s unmask phase (``quorum``, ``enough`` or ``deadline``), fire the round, plan its shards
    and send what is left to do. Idempotent: every later run (redelivery, the sweep) finds each step done and goes
    on; an ``enough`` run that did not close the phase itself stops (the run that closed it goes on)."""
    pub = public(rt, federation, r)
    if pub is None:
        return "no_round"
    params = pub.params(federation, r)
    rounds = rounds_of(rt, federation)
    state = rounds.state(r)
    if state is not None and state.phase is SecAggPhase.UNMASK:
        reply, _ = advance(rounds, params, mode, now=now)
        if reply.status == "aborted":
            log.warning("round %s/%s: secure aggregation aborted: %s", federation, r, reply.detail)
            return reply.status
        if reply.status == "not_due":
            return reply.status
        if mode == SecAggClose.ENOUGH and reply.status != "ok":
            # several pumps may each see 'enough' and send this task: only the run whose fenced close won goes on
            # (a closer that dies after its close is covered like any: the sweep re-sends a done round's task)
            return "stale"
        state = rounds.state(r)  # closed, here or by a concurrent run ('stale')
    elif mode == SecAggClose.ENOUGH:
        return "stale"  # closed before this run: its closer (or the sweep) goes on
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
    stored = rt.state.plan(federation, r)
    if stored is None:
        with Heartbeat(rt, federation, r, epoch):
            try:
                plan = make_secure_plan(rt, federation, r, pub)
            except SecAggError as exc:  # deterministic: every rerun would fail the same way
                outcome = rt.state.fail(federation, r, epoch, f"{type(exc).__name__}: {exc}")
                log.error("secure round %s/%s cannot be planned: %s (%s)", federation, r, exc, outcome.status)
                return "failed"
        stored = rt.state.set_plan(federation, r, plan.to_json())  # the first plan stored wins
    plan = SecurePlan.from_json(stored)
    shards = len(plan.shards)
    return send_missing_shards(rt, dispatch, federation, r, epoch, shards, Task.SECURE_SHARD, Task.SECURE_COMMIT)


def make_secure_plan(rt: Runtime, federation: str, r: int, pub: RoundPublic) -> SecurePlan:
    """Round ``r``'s plan from what its done secure aggregation stored (no masked input is read)."""
    params = pub.params(federation, r)
    rounds = rounds_of(rt, federation)
    server = replay(rounds, r, params)  # done: every stored message, as when the unmask phase closed
    summed = tuple(sorted(server.survivors))
    masked = {
        c: wire.parse_masked(c, payload, params.neighbour_count).sha256
        for c, payload in rounds.submissions(r, SecAggPhase.MASKED_INPUT).items()
        if c in server.survivors
    }
    layout = dict(pub.layout.entries)
    trained = f".{pub.trainable}.weight"
    keys = {m: f"{m}{trained}" for m in rt.state.modules(federation) if f"{m}{trained}" in layout}
    keys.update({k: k for k in rt.state.extras(federation) if k in layout})
    if set(keys.values()) != set(layout):
        raise SecAggError(f"round {r}'s masked layout does not match the federation's modules and head")
    items = tuple(sorted(keys))
    spans = pub.layout.spans()
    sizes = [(spans[keys[i]][1] - spans[keys[i]][0]) * U64.itemsize * len(summed) for i in items]
    count = min(rt.settings.max_shards, len(items), max(1, math.ceil(sum(sizes) / rt.settings.shard_bytes)))
    return SecurePlan(
        summed=summed,
        masked=masked,
        dropped={c: str(p) for c, p in sorted(server.dropped.items())},
        rejected=dict(sorted(server.rejected.items())),
        items=items,
        keys=keys,
        shards=balanced_ranges(sizes, count),
    )


# -- the shards --------------------------------------------------------------------------------------


def run_secure_shard(rt: Runtime, federation: str, r: int, epoch: int, k: int, dispatch: Dispatcher) -> str:
    """Unmask shard ``k`` of secure round ``r`` under ``epoch`` (idempotent); the last shard enqueues the commit."""
    info = rt.state.round(federation, r)
    if info.state != RoundStatus.AGGREGATING or info.epoch != epoch:
        return "stale"
    raw = rt.state.plan(federation, r)
    if raw is None:
        raise SecAggError(f"secure round {r} of {federation!r} has no plan; its round task must run first")
    plan = SecurePlan.from_json(raw)
    done = rt.state.shards(federation, r)
    if k in done:
        if len(done) == len(plan.shards):  # the run that finished last may have died before enqueueing the commit
            dispatch.send(Task.SECURE_COMMIT, federation, r, epoch)
        return "done"
    pub = public(rt, federation, r)
    assert pub is not None  # a fired secure round has its public parameters
    with Heartbeat(rt, federation, r, epoch) as beat:
        try:
            result = compute_secure_shard(rt, federation, r, k, plan, pub)
        except SecAggError as exc:
            # deterministic (the stored state does not unmask): every rerun would fail the same way
            outcome = rt.state.fail(federation, r, epoch, f"{type(exc).__name__}: {exc}")
            log.error("secure round %s/%s shard %s failed: %s (%s)", federation, r, k, exc, outcome.status)
            return "failed"
    if beat.lost:
        return "stale"
    reply = rt.state.shard_done(federation, r, k, len(plan.shards), result.to_json(), epoch=epoch)
    if reply.detail == "last":
        dispatch.send(Task.SECURE_COMMIT, federation, r, epoch)
    return reply.status


def compute_secure_shard(
    rt: Runtime, federation: str, r: int, k: int, plan: SecurePlan, pub: RoundPublic
) -> ShardResult:
    """Shard ``k``'s tensors: the frozen factor as round ``pub.start`` published it, and the sum's slice for its
    items, unmasked, decoded, noised (DP) and divided by the summed weight; written to one object."""
    import torch

    from ..adapters import write_safetensors

    params = pub.params(federation, r)
    started = time.perf_counter()
    server = replay(rounds_of(rt, federation), r, params)
    if tuple(sorted(server.survivors)) != plan.summed:
        raise SecAggError(f"round {r}'s stored survivors are not the ones its plan sums")
    seeds = server.unmask_seeds()
    items = plan.shard_items(k)
    spans = pub.layout.spans()
    runs = _runs(sorted(spans[plan.keys[i]] for i in items))
    fetched = time.perf_counter()
    slices, bytes_in = _read_slices(rt, federation, plan, params.length, runs)
    fetched = time.perf_counter() - fetched
    total_weight = math.fsum(pub.weights[c] for c in plan.summed)
    sums: dict[int, Encoded] = {lo: unmask_slice(slices[lo], seeds, lo) for lo, _ in runs}
    sigma = pub.sigma()
    noise_key = rt.state.noise_key(federation) if sigma else ""
    trained: dict[str, torch.Tensor] = {}
    for item in items:
        key = plan.keys[item]
        lo, hi = spans[key]
        run = max(a for a, _ in runs if a <= lo)
        total = params.encoding.decode_sum(sums[run][lo - run : hi - run], len(plan.summed))
        if sigma:
            from ..aggregation.dp import noise_generator
            from ..secagg.dp import noise_sum

            # per tensor, secret but deterministic: any shard split, and any rerun, releases the same noise
            total = noise_sum(total, sigma, noise_generator(noise_key, federation, r, f"secagg|{key}"))
        value = (total / total_weight).reshape(dict(pub.layout.entries)[key])
        trained[key] = torch.from_numpy(np.ascontiguousarray(value)).to(torch.float32)
    config = rt.state.config(federation)
    state: dict[str, torch.Tensor] = {}
    if config.server_opt != ServerOptimizer.NONE:  # post-processing of the released average: reveals nothing more
        trained, state = _server_step(rt, federation, pub, config, trained)
    # the trained factor (and the head) only: the manifest refers to where the frozen factors lie; a strategy that
    # froze nothing would carry the start's tensors for anything the masked vector does not hold
    carried = [] if strategy_spec(config.strategy).framed(r) else items
    published = previous_global(rt, federation, pub.start, carried)
    tensors: dict[str, torch.Tensor] = {}
    for m, mod in published.modules.items():
        tensors[f"{m}.lora_A.weight"] = mod.A.to(torch.float32)
        tensors[f"{m}.lora_B.weight"] = mod.B.to(torch.float32)
    for key, t in published.extras.items():
        tensors[key] = t.to(torch.float32)
    if set(published.modules) | set(published.extras) != set(carried):
        raise SecAggError(f"round {pub.start} did not publish every item of shard {k}: {items}")
    tensors.update(trained)
    computed = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=rt.spool) as tmp:
        local = Path(tmp) / "shard.safetensors"
        sha = write_safetensors(local, tensors, {"format": SHARD_FORMAT})
        key = _put_once(rt, shard_key(federation, r, k, "adapter", sha), local)
        size = local.stat().st_size
        opt_state = _write_state(rt, federation, r, k, state, Path(tmp)) if state else None
    written = time.perf_counter()
    return ShardResult(
        adapter=ObjectRef(key, sha, size),
        residual=None,
        out={},
        residual_bytes=0,
        adapter_bytes=size,
        bytes_in=bytes_in,
        seconds={
            "fetch": round(fetched, 4),
            "math": round(computed - started - fetched, 4),
            "write": round(written - computed, 4),
        },
        opt_state=opt_state,
    )


def _server_step(
    rt: Runtime, federation: str, pub: RoundPublic, config: FederationConfig, average: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--server-opt`` on a secure round: each unmasked average (the trained factor of a module, or a head) is
    stepped from the global the round started from (``pub.start``) with that round's optimiser state, as a plain
    round of a linear strategy steps it (``workers/server_step.py``); returns the stepped tensors and the new
    state by tensor name."""
    import contextlib

    from ..aggregation import ModuleResult
    from ..aggregation.server_opt import factor_of, with_factor
    from .server_step import ServerStep

    suffix = f".{pub.trainable}.weight"
    names = {key: key.removesuffix(suffix) if key.endswith(suffix) else key for key in average}
    out, state = {}, {}
    with contextlib.ExitStack() as stack:
        step = ServerStep.start(
            rt, federation, pub.start, config, names.values(), stack, product=False, trained=pub.trainable
        )
        assert step is not None  # the caller checked that the federation has an optimiser
        for key, value in average.items():
            name = names[key]
            if name == key:  # a head
                out[key], new = step.extra(key, value)
            else:
                prev = step.previous.modules.get(name)
                if prev is None:
                    raise SecAggError(f"round {pub.start} published no module {name!r} to step from")
                start = ModuleResult(prev.A, prev.B, prev.scaling, None, prev.R)
                stepped, new = step.module(name, with_factor(start, pub.trainable, value))
                moved = factor_of(stepped, pub.trainable)
                assert moved is not None  # the factor it was just given
                out[key] = moved
            state.update(new)
    return out, state


def _write_state(rt: Runtime, federation: str, r: int, k: int, state: dict[str, Any], tmp: Path) -> ObjectRef:
    """Shard ``k``'s server optimiser state as one write-once object (the next round reads it)."""
    from ..adapters import write_safetensors

    local = tmp / "opt-state.safetensors"
    sha = write_safetensors(local, state, {"format": SERVER_STATE_FORMAT})
    key = _put_once(rt, shard_key(federation, r, k, "opt-state", sha), local)
    return ObjectRef(key, sha, local.stat().st_size)


def _put_once(rt: Runtime, key: str, local: Path) -> str:
    """Store ``local`` under content-addressed ``key``, write-once; returns the key."""
    try:
        rt.store.put_file(key, local, write_once=True)
    except ObjectExists:
        pass  # a rerun: the same bytes under the same content-addressed key
    return key


def _runs(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, end) spans merged where they touch: one ranged read per run and survivor."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _read_slices(
    rt: Runtime, federation: str, plan: SecurePlan, length: int, runs: list[tuple[int, int]]
) -> tuple[dict[int, list[Encoded]], int]:
    """Run start -> every survivor's words of that run, read by range from the workers' accepted copies (each
    checked whole, hash and shape, when it was accepted; only the workers write that prefix)."""
    out: dict[int, list[Encoded]] = {lo: [] for lo, _ in runs}
    read = 0
    for c in plan.summed:
        key = accepted_key(federation, c, plan.masked[c])
        n = int.from_bytes(rt.store.get_range(key, 0, 8), "little")
        if n > rt.settings.max_header_bytes:
            raise SecAggError(f"{c}'s accepted masked input has a {n}-byte header")
        begin = data_begin(rt.store.get_range(key, 0, 8 + n), length)
        for lo, hi in runs:
            raw = rt.store.get_range(key, begin + lo * U64.itemsize, begin + hi * U64.itemsize)
            if len(raw) != (hi - lo) * U64.itemsize:
                raise SecAggError(f"{c}'s accepted masked input is shorter than its header says")
            out[lo].append(np.frombuffer(raw, dtype=U64))
            read += len(raw)
    return out, read


# -- the commit --------------------------------------------------------------------------------------


def commit_secure(rt: Runtime, federation: str, r: int, epoch: int) -> str:
    """Write secure round ``r``'s manifest (write-once) and finalize it under ``epoch``. Idempotent."""
    started = time.perf_counter()
    info = rt.state.round(federation, r)
    if info.state == RoundStatus.COMPLETE:
        return "already"
    if info.state != RoundStatus.AGGREGATING or info.epoch != epoch:
        return "stale"
    key = manifest_key(federation, r)
    try:
        raw = rt.store.get_bytes(key)  # an earlier commit wrote it and died before finalizing
    except ObjectMissing:
        raw = _manifest(rt, federation, r, epoch, started).to_json()
        try:
            rt.store.put_bytes(key, raw, write_once=True)
        except ObjectExists:
            raw = rt.store.get_bytes(key)  # a concurrent commit won: adopt its bytes
    manifest = Manifest.from_json(raw)
    secure = manifest.secure or {}
    reply = rt.state.finalize(
        federation,
        r,
        epoch,
        key,
        hashlib.sha256(raw).hexdigest(),
        {"clients": list(secure.get("summed", [])), "secure": secure},
    )
    if reply.status == ScriptStatus.OK:
        rt.state.forget_round_work(federation, r)  # the manifest now holds the plan and the shard results
        if manifest.server_opt is not None:
            try:  # only this round's optimiser state is read again (by the next); the sweep retries the rest
                collect_states(rt, federation)
            except Exception as exc:
                log.warning("round %s/%s: older server optimiser states not collected yet: %s", federation, r, exc)
    return str(reply.status)


def _manifest(rt: Runtime, federation: str, r: int, epoch: int, started: float) -> Manifest:
    raw_plan = rt.state.plan(federation, r)
    if raw_plan is None:
        raise ObjectMissing(f"secure round {r} of {federation!r} has no plan")
    plan = SecurePlan.from_json(raw_plan)
    pub = public(rt, federation, r)
    assert pub is not None
    results = {k: ShardResult.from_json(v) for k, v in rt.state.shards(federation, r).items()}
    shards = []
    timings = {"fetch": 0.0, "math": 0.0, "write": 0.0}
    for k in range(len(plan.shards)):
        items = plan.shard_items(k)
        res = results[k]
        shards.append(ShardEntry(k, items[0], items[-1], len(items), res.adapter, None, opt_state=res.opt_state))
        for phase in timings:
            timings[phase] += res.seconds.get(phase, 0.0)
    timings = {p: round(v, 4) for p, v in timings.items()}
    timings["commit"] = round(time.perf_counter() - started, 4)
    total_weight = math.fsum(pub.weights[c] for c in plan.summed)
    start_manifest, _ = fetch_manifest(rt.state, rt.store, federation, pub.start)
    dp: dict[str, Any] | None = None
    if pub.noise_multiplier:
        dp = {
            "noise_multiplier": pub.noise_multiplier,
            "clip_norm": pub.clip_norm,
            "delta": rt.state.config(federation).dp_delta,
            "sigma": pub.sigma(),
            "clients": len(pub.cohort),
        }
    return Manifest(
        federation=federation,
        round=r,
        epoch=epoch,
        strategy=start_manifest.strategy,
        base_model=start_manifest.base_model,
        adapter_config=start_manifest.adapter_config,
        clients=tuple(ClientEntry(c, plan.masked[c], None, pub.weights[c] / total_weight) for c in plan.summed),
        shards=tuple(shards),
        selected=pub.cohort,
        dp=dp,
        modules=len(plan.items) - len(plan.extras),
        adapter_bytes=sum(res.adapter_bytes for res in results.values()),
        timings=timings,
        secure={
            "summed": list(plan.summed),
            "dropped": plan.dropped,
            "rejected": plan.rejected,
            "weights": dict(pub.weights),
            "trainable": str(pub.trainable),
            "neighbours": pub.neighbours,
            "threshold": pub.threshold,
        },
        frame=round_frame(rt, federation, start_manifest.strategy, r, pub.start),
        server_opt=_server_opt_settings(rt.state.config(federation), pub.start),
    )


def _server_opt_settings(config: FederationConfig, start: int) -> dict[str, Any] | None:
    settings = config.server_opt_settings()
    return {**settings, "previous_round": start} if settings else None
