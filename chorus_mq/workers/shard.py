"""Aggregate one shard of a round: a contiguous run of its modules, streamed to write-once objects.

Any worker takes any shard. A shard reads only its modules' bytes of each accepted delta,
aggregates them (modules side by side, one torch thread each, at most a few in flight), and
streams the results into two objects (the adapter part and the residual part; with a server
optimiser a third, its state: ``server_step.py``) whose header is known before the first tensor
is computed. The outputs depend only on the plan and the
deltas, never on the shard count or the worker, so a rerun writes the same bytes. The last
shard to finish (a fenced counter in Redis) enqueues the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import StreamingWriter
from ..adapters.fileformat import DTYPES
from ..aggregation import (
    ClientMeta,
    ClientUpdate,
    ModuleResult,
    aggregate_module,
    map_ordered,
    output_layout,
    weighted_mean,
)
from ..aggregation.dp import dp_head_release, dp_release, noise_generator, release_sigma
from ..aggregation.dp_linear import linear_dp_release
from ..aggregation.drift import ModuleAlignment
from ..aggregation.robust import clip_update
from ..aggregation.server_opt import PreviousFactors, factor_of
from ..errors import AggregationError
from ..layout import shard_key
from ..manifest import ObjectRef
from ..names import (
    RESIDUAL_FORMAT,
    SERVER_STATE_FORMAT,
    SHARD_FORMAT,
    Factor,
    MissingModules,
    RoundStatus,
    Task,
)
from ..state import FederationConfig
from ..strategy import strategy_spec
from . import drift
from .declared import Declared, declared_model
from .dispatch import Dispatcher
from .flush import FlushStep, holder_weights
from .lease import Heartbeat
from .metrics import METRICS
from .previous import PreviousModule, previous_global
from .reading import RoundInputs, carried_heads
from .round_plan import Plan
from .runtime import Runtime
from .server_step import ServerStep

if TYPE_CHECKING:
    from .variates import ShardVariates

log = logging.getLogger(__name__)

_F32 = torch.float32
#: a streamed object's tensors in order: (name, dtype, shape)
_Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class ShardResult:
    """What a shard reports to the commit (stored in Redis with the fenced counter)."""

    adapter: ObjectRef
    residual: ObjectRef | None
    #: module -> [adapter rank, adapter scaling]
    out: dict[str, tuple[int, float]]
    residual_bytes: int
    adapter_bytes: int
    bytes_in: int
    seconds: dict[str, float] = field(default_factory=dict)
    #: SCAFFOLD: the shard's server variate, and the clip factors below 1 ("client|item")
    variate: ObjectRef | None = None
    variate_clipped: dict[str, float] = field(default_factory=dict)
    #: the shard's sums for each client's cosine to the aggregate (``aggregation.drift.AlignmentSums``)
    drift: dict[str, Any] | None = None
    #: the server optimiser's state for the shard's items (``--server-opt`` only)
    opt_state: ObjectRef | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> ShardResult:
        d = json.loads(raw)
        residual, variate, state = d.get("residual"), d.get("variate"), d.get("opt_state")
        return cls(
            adapter=ObjectRef.from_dict(d["adapter"]),
            residual=None if residual is None else ObjectRef.from_dict(residual),
            out={k: (int(v[0]), float(v[1])) for k, v in d["out"].items()},
            residual_bytes=int(d["residual_bytes"]),
            adapter_bytes=int(d["adapter_bytes"]),
            bytes_in=int(d["bytes_in"]),
            seconds={k: float(v) for k, v in d["seconds"].items()},
            variate=None if variate is None else ObjectRef.from_dict(variate),
            variate_clipped={k: float(v) for k, v in (d.get("variate_clipped") or {}).items()},
            drift=d.get("drift"),
            opt_state=None if state is None else ObjectRef.from_dict(state),
        )


def run_shard(rt: Runtime, federation: str, r: int, epoch: int, k: int, dispatch: Dispatcher) -> str:
    """Compute shard ``k`` of round ``r`` (idempotent); the last shard to finish enqueues the commit."""
    started = time.perf_counter()
    info = rt.state.round(federation, r)
    if info.state != RoundStatus.AGGREGATING or info.epoch != epoch:
        log.info("skip shard %s/%s/%s epoch %s: state %s epoch %s", federation, r, k, epoch, info.state, info.epoch)
        return "stale"
    done = rt.state.shards(federation, r)
    if k in done:
        raw = rt.state.plan(federation, r)
        if raw is not None and len(done) == len(Plan.from_json(raw).shards):
            # every shard is in: the run that finished last may have died before enqueueing the commit
            dispatch.send(Task.COMMIT, federation, r, epoch)
        return "done"
    raw_plan = rt.state.plan(federation, r)
    if raw_plan is None:
        raise AggregationError(f"round {r} of {federation!r} has no plan; its round task must run first")
    plan = Plan.from_json(raw_plan)
    config = rt.state.config(federation)
    METRICS.shards_in_flight.inc()
    try:
        with Heartbeat(rt, federation, r, epoch) as beat:
            try:
                result = compute_shard(rt, federation, r, k, plan, config)
            except AggregationError as exc:
                # deterministic: every rerun would fail the same way, so the round fails now, cleanly
                outcome = rt.state.fail(federation, r, epoch, f"{type(exc).__name__}: {exc}")
                log.error("round %s/%s shard %s failed: %s (%s)", federation, r, k, exc, outcome.status)
                METRICS.rounds.labels(state="failed").inc()
                return "failed"
    finally:
        METRICS.shards_in_flight.dec()
    if beat.lost:
        return "stale"
    # the task's own wall time, its reads of the round's state included: what a worker spends on the shard
    result = dataclasses.replace(result, seconds={**result.seconds, "shard": round(time.perf_counter() - started, 4)})
    reply = rt.state.shard_done(federation, r, k, len(plan.shards), result.to_json(), epoch=epoch)
    if reply.detail == "last":
        dispatch.send(Task.COMMIT, federation, r, epoch)
    return reply.status


@dataclass
class _Job:
    """One item of the shard: a LoRA module or an extra (a modules_to_save tensor)."""

    name: str
    extra: bool
    holders: list[str]
    absent: float = 0.0
    #: the holders' weights and the absent mass the strategy aggregates with: ``holders``' plan weights and
    #: ``absent``, but a flush's norm bound keeps its clip factors in them (``flush.holder_weights``)
    weights: list[float] = field(default_factory=list)
    strategy_absent: float = 0.0
    rank: int = 0
    residual: str = "none"
    residual_rank: int = 0
    shape: tuple[int, ...] = ()
    frozen_a: bool = False  # DP: every client shares one frozen orthonormal A (noise on B alone)
    #: DP: the holders' updates, read once to look at their A's and kept for the math (a shard's inputs
    #: are bounded by CHORUS_SHARD_BYTES)
    loaded: list[ClientUpdate] | None = None
    #: the holders' inputs as uploaded (before any clip), until the item is written (SCAFFOLD reads them)
    raw: list[Any] | None = None
    alignment: ModuleAlignment | None = None  # this module's part of each holder's cosine to the aggregate
    #: Fed-SB: the published frame (B, A) each holder's R is trained between
    frame: PreviousModule | None = None
    #: ffa-lora, rolora: the frozen factor as the round's start published it, and its float32 bytes: the
    #: holders' trained factor alone is read (``RoundInputs.trained_update``)
    frozen: tuple[Factor, torch.Tensor, bytes] | None = None
    #: a linear strategy under DP in a synchronous round: the module as the round's start published it (the
    #: version the release moves, and every client's base)
    current: PreviousModule | None = None


def compute_shard(rt: Runtime, federation: str, r: int, k: int, plan: Plan, config: FederationConfig) -> ShardResult:
    """Aggregate shard ``k``'s items and write its two objects; returns what the commit needs."""
    started = time.perf_counter()
    inputs, jobs = _plan_jobs(rt, federation, r, k, plan, config)
    seconds = {"fetch": 0.0, "math": 0.0, "write": 0.0}
    seconds["fetch"] += time.perf_counter() - started
    if plan.dp and not _linear(plan):
        _dp_layouts(jobs, inputs, plan)
    with contextlib.ExitStack() as stack:
        trained = strategy_spec(plan.strategy).trainable(r)  # a linear strategy steps the factor it trained
        step = ServerStep.open(rt, federation, plan, config, plan.shard_items(k), stack, trained)
        flush = FlushStep.open(rt, federation, plan, plan.shard_items(k))
        state_layout = _output_forms(jobs, step, flush)
        files = _ShardFiles.open(stack, rt, (federation, r, k), plan, config, jobs, state_layout)
        for job, result, took in _results(jobs, inputs, plan, config, federation, r, rt, seconds, step, flush):
            seconds["math"] += took
            t0 = time.perf_counter()
            files.write(job, result, stepped=step is not None)
            seconds["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        files.close()
    seconds["write"] += time.perf_counter() - t0
    return _report(files, jobs, inputs, seconds)


def _plan_jobs(
    rt: Runtime, federation: str, r: int, k: int, plan: Plan, config: FederationConfig
) -> tuple[RoundInputs, list[_Job]]:
    """The round's accepted inputs and shard ``k``'s jobs, each with what it reads from the published round
    (Fed-SB's frame, a linear strategy's frozen factor)."""
    records = rt.state.deltas(federation, r)
    inputs = RoundInputs(rt, {c: records[c] for c in plan.clients})
    declared = declared_model(rt, federation, config)
    jobs = [_job(item, plan, inputs, declared) for item in plan.shard_items(k)]
    spec = strategy_spec(plan.strategy)
    if spec.sandwich:  # Fed-SB: every round keeps round 0's frame; the latest published round carries it
        _attach_frames(rt, federation, jobs)
    frozen = spec.frozen(r)
    if frozen is not None and (spec.linear or not plan.dp):  # ffa-lora, rolora: read each upload's trained factor
        _attach_frozen(rt, federation, jobs, frozen)
    return inputs, jobs


def _published(rt: Runtime, federation: str, jobs: Sequence[_Job]) -> dict[str, PreviousModule]:
    """The latest published round's modules among ``jobs``."""
    latest = rt.state.latest_complete(federation)
    return previous_global(rt, federation, latest, [j.name for j in jobs if not j.extra]).modules


def _attach_frames(rt: Runtime, federation: str, jobs: Sequence[_Job]) -> None:
    """Fed-SB: each module's frame (B, A), which the latest published round carries from round 0."""
    frame = _published(rt, federation, jobs)
    for job in jobs:
        if not job.extra:
            if job.name not in frame:
                raise AggregationError(f"module {job.name!r}: no published fed-sb frame (round 0) to train in")
            job.frame = frame[job.name]


def _attach_frozen(rt: Runtime, federation: str, jobs: Sequence[_Job], frozen: Factor) -> None:
    """ffa-lora, rolora: each module's ``frozen`` factor as the round's start published it, and its bytes."""
    published = _published(rt, federation, jobs)
    for job in jobs:
        if not job.extra:
            if job.name not in published:
                raise AggregationError(f"module {job.name!r}: the round's start published no {frozen}")
            module = published[job.name]
            shared = (module.A if frozen == Factor.LORA_A else module.B).to(_F32).contiguous()
            job.frozen = (frozen, shared, shared.numpy().tobytes())
            job.current = module


def _output_forms(jobs: Sequence[_Job], step: ServerStep | None, flush: FlushStep | None) -> _Layout:
    """Set each module's residual form where a buffered flush or a server step decides it; the server step's
    state layout (empty without one)."""
    if flush is not None:  # a buffered flush publishes version v+1 exactly (workers/flush.py)
        for job in jobs:
            if not job.extra:
                shape = (job.shape[0], job.shape[1])
                job.residual, job.residual_rank = flush.residual_form(
                    job.name, job.holders, job.absent, shape, job.residual, job.rank, job.residual_rank
                )
    state_layout: _Layout = []
    if step is not None:
        for job in jobs:
            job.residual = step.residual_form(job.extra, job.residual)
            state_layout += step.layout(job.name, extra=job.extra, shape=job.shape, rank=job.rank)
    return state_layout


def _stream(
    stack: contextlib.ExitStack[Any], rt: Runtime, shard: tuple[str, int, int], kind: str, layout: _Layout, fmt: str
) -> tuple[Any, StreamingWriter]:
    """One of the shard's write-once objects (``shard``: federation, round, shard), streamed and hashed through
    its path as its tensors come; stored when ``stack`` closes cleanly."""
    federation, r, k = shard
    written = stack.enter_context(rt.store.writer(lambda sha: shard_key(federation, r, k, kind, sha)))
    written.file.close()  # written through its path by the streaming writer (then fsynced by path)
    return written, StreamingWriter(written.path, layout, {"format": fmt})


@dataclass
class _ShardFiles:
    """The shard's write-once objects as their tensors stream in: the adapter part, the residual part (where a
    module keeps one), SCAFFOLD's variate, the server optimiser's state; and what was written."""

    framed: tuple[Factor, ...]  # the factors the round refers to where they lie, not written
    adapter_out: Any
    adapter_file: StreamingWriter
    residual_out: Any = None
    residual_file: StreamingWriter | None = None
    variates: ShardVariates | None = None
    state_out: Any = None
    state_file: StreamingWriter | None = None
    #: module -> [adapter rank, adapter scaling]
    out: dict[str, tuple[int, float]] = field(default_factory=dict)
    adapter_bytes: int = 0
    residual_bytes: int = 0

    @classmethod
    def open(
        cls,
        stack: contextlib.ExitStack[Any],
        rt: Runtime,
        shard: tuple[str, int, int],
        plan: Plan,
        config: FederationConfig,
        jobs: Sequence[_Job],
        state_layout: _Layout,
    ) -> _ShardFiles:
        """Lay out and open shard ``shard``'s (federation, round, shard) objects on ``stack``."""
        federation, r, k = shard
        framed = strategy_spec(plan.strategy).framed(r)
        adapter_layout, residual_layout = _layouts(jobs, framed)
        adapter_out, adapter_file = _stream(stack, rt, shard, "adapter", adapter_layout, SHARD_FORMAT)
        files = cls(framed, adapter_out, adapter_file)
        if residual_layout:
            files.residual_out, files.residual_file = _stream(
                stack, rt, shard, "residual", residual_layout, RESIDUAL_FORMAT
            )
        if plan.variate_fraction:
            from .variates import ShardVariates

            files.variates = ShardVariates(rt, federation, r, k, plan, config, stack, adapter_layout)
        if state_layout:
            files.state_out, files.state_file = _stream(
                stack, rt, shard, "opt-state", state_layout, SERVER_STATE_FORMAT
            )
        return files

    def write(self, job: _Job, result: Any, *, stepped: bool) -> None:
        """``job``'s result (``stepped``: paired with its new server optimiser state) into the objects."""
        if stepped:
            result, state = result
            assert self.state_file is not None
            for name, tensor in state.items():
                self.state_file.write(name, tensor)
        if job.extra:
            tensor = result.to(_F32).contiguous()
            self.adapter_file.write(job.name, tensor)
            self.adapter_bytes += tensor.numel() * 4
        else:
            assert isinstance(result, ModuleResult)
            _check_shape(job, result)
            self._write_factors(job, result)
            self.out[job.name] = (int(result.A.shape[0]), float(result.scaling))
            self._write_residual(job, result)
        if self.variates is not None:
            self.variates.add(job.name, job.extra, job.holders, job.raw or [], result)
        job.raw = None

    def _write_factors(self, job: _Job, result: ModuleResult) -> None:
        for factor, tensor in ((Factor.LORA_A, result.A), (Factor.LORA_B, result.B), (Factor.LORA_R, result.R)):
            if factor in self.framed or tensor is None:
                continue  # frozen: the manifest refers to where it lies (Fed-SB's R: the sandwich's only)
            self.adapter_file.write(f"{job.name}.{factor}.weight", tensor.to(_F32).contiguous())
            self.adapter_bytes += tensor.numel() * 4

    def _write_residual(self, job: _Job, result: ModuleResult) -> None:
        res = result.residual
        if job.residual == "dense":
            assert res is not None and self.residual_file is not None
            self.residual_file.write(f"{job.name}.residual", res.to_dense())
            self.residual_bytes += res.nbytes
        elif job.residual == "factored":
            assert res is not None and res.left is not None and res.right is not None
            assert self.residual_file is not None
            self.residual_file.write(f"{job.name}.residual_left", res.left)
            self.residual_file.write(f"{job.name}.residual_right", res.right)
            self.residual_bytes += res.nbytes

    def close(self) -> None:
        """Finish every object's tensors (stored when the stack closes)."""
        # the streaming writers hashed every byte they wrote: the store need not read them again
        self.adapter_out.trusted_sha256 = self.adapter_file.close()
        if self.residual_file is not None and self.residual_out is not None:
            self.residual_out.trusted_sha256 = self.residual_file.close()
        if self.variates is not None:
            self.variates.finish()
        if self.state_file is not None and self.state_out is not None:
            self.state_out.trusted_sha256 = self.state_file.close()


def _report(files: _ShardFiles, jobs: Sequence[_Job], inputs: RoundInputs, seconds: dict[str, float]) -> ShardResult:
    """The shard's metrics, and what it reports to the commit."""
    for phase, value in seconds.items():
        METRICS.phase_seconds.labels(phase=phase).observe(value)
    METRICS.bytes_in.labels(task="shard").inc(inputs.bytes_read)
    adapter_ref = _ref(files.adapter_out.result)
    residual_ref = _ref(files.residual_out.result) if files.residual_out is not None else None
    state_ref = _ref(files.state_out.result) if files.state_out is not None else None
    METRICS.bytes_out.labels(task="shard").inc(
        adapter_ref.size + sum(ref.size for ref in (residual_ref, state_ref) if ref is not None)
    )
    variates = files.variates
    return ShardResult(
        adapter=adapter_ref,
        residual=residual_ref,
        out=files.out,
        residual_bytes=files.residual_bytes,
        adapter_bytes=files.adapter_bytes,
        bytes_in=inputs.bytes_read,
        seconds={k_: round(v, 4) for k_, v in seconds.items()},
        variate=None if variates is None else variates.ref,
        variate_clipped={} if variates is None else variates.clipped,
        drift=drift.shard_sums((job.holders, job.alignment) for job in jobs),
        opt_state=state_ref,
    )


def _ref(written: Any) -> ObjectRef:
    return ObjectRef(key=written.key, sha256=written.sha256, size=written.size)


def _job(item: str, plan: Plan, inputs: RoundInputs, declared: Declared) -> _Job:
    if item in plan.extras:
        # --personal-heads: no client sends its head; the one published is round 0's (plan.heads)
        holders = [] if plan.heads else list(plan.clients)
        return _Job(item, True, holders, shape=tuple(declared.decl.extras[item]))
    holders = inputs.holders(item)
    absent = 0.0
    if plan.missing == MissingModules.ZERO:
        absent = sum(plan.weights[c] for c in plan.clients if c not in holders)
    d_out, d_in = declared.decl.modules[item]
    weights, strategy_absent = holder_weights(plan, item, holders, absent)
    job = _Job(item, False, holders, absent, weights, strategy_absent, shape=(d_out, d_in))
    if not plan.dp or _linear(plan):  # a linear strategy's DP release keeps its layout (aggregation.dp_linear)
        metas = [_meta(inputs, c, item, w) for c, w in zip(holders, weights, strict=True)]
        layout = output_layout(
            plan.strategy, metas, d_out, d_in, absent_weight=strategy_absent, out_rank=_out_rank(plan)
        )
        job.rank, job.residual, job.residual_rank = layout.rank, layout.residual, layout.residual_rank
    return job


def _meta(inputs: RoundInputs, client: str, module: str, weight: float) -> ClientMeta:
    entry = inputs.indexes[client].modules[module]
    dtype = torch.promote_types(DTYPES[entry.a.dtype][1], DTYPES[entry.b.dtype][1])
    return ClientMeta(rank=entry.rank, scaling=entry.scaling, weight=weight, dtype=dtype)


def _out_rank(plan: Plan) -> int | None:
    # the output rank is a choice only for svd; the others keep the clients' largest rank
    if not strategy_spec(plan.strategy).out_rank_option:
        return None
    return plan.out_rank or None


def _linear(plan: Plan) -> bool:
    """A linear strategy (a frozen shared frame): under DP its trained factor alone is noised."""
    return strategy_spec(plan.strategy).linear


def _dp_layouts(jobs: list[_Job], inputs: RoundInputs, plan: Plan) -> None:
    """DP results depend on values (a shared frozen orthonormal A keeps noise on B): look at the A's first."""
    from ..aggregation.dp import dp_layout, frozen_shared_a

    for job in jobs:
        if job.extra:
            continue
        updates = [inputs.update(c, job.name, plan.weights[c]) for c in job.holders]
        # a buffered flush noises the dense update (its frozen-A form is not built): see workers/flush.py
        job.frozen_a = not plan.flush_lr and frozen_shared_a(updates)
        job.loaded = updates
        layout = dp_layout(
            [int(u.A.shape[0]) for u in updates],
            job.shape[0],
            job.shape[1],
            frozen_a=job.frozen_a,
            out_rank=plan.out_rank or None,
        )
        job.rank, job.residual, job.residual_rank = layout.rank, layout.residual, layout.residual_rank


def _layouts(jobs: Sequence[_Job], framed: Sequence[Factor] = ()) -> tuple[_Layout, _Layout]:
    """The shard's adapter and residual layouts; ``framed``: the factors the round refers to, not written."""
    adapter: _Layout = []
    residual: _Layout = []
    for job in jobs:
        if job.extra:
            adapter.append((job.name, _F32, job.shape))
            continue
        d_out, d_in = job.shape
        shapes = {Factor.LORA_A: (job.rank, d_in), Factor.LORA_B: (d_out, job.rank)}
        if job.frame is not None:  # Fed-SB: the averaged R between the frame
            shapes[Factor.LORA_R] = (job.rank, job.rank)
        # the canonical order (by name): lora_A, lora_B, lora_R
        adapter += [(f"{job.name}.{f}.weight", _F32, shape) for f, shape in shapes.items() if f not in framed]
        if job.residual == "dense":
            residual.append((f"{job.name}.residual", _F32, (d_out, d_in)))
        elif job.residual == "factored":
            residual.append((f"{job.name}.residual_left", _F32, (d_out, job.residual_rank)))
            residual.append((f"{job.name}.residual_right", _F32, (job.residual_rank, d_in)))
    return adapter, residual


def _results(
    jobs: Sequence[_Job],
    inputs: RoundInputs,
    plan: Plan,
    config: FederationConfig,
    federation: str,
    r: int,
    rt: Runtime,
    seconds: dict[str, float],
    step: ServerStep | None = None,
    flush: FlushStep | None = None,
) -> Iterator[tuple[_Job, Any, float]]:
    """Each job's result, in order, computed a few at a time (inputs load in this thread); with a server
    ``step``, each result is a pair (the stepped result, its new state)."""
    noise_key = rt.state.noise_key(federation) if plan.dp else ""
    trains = strategy_spec(plan.strategy).trainable(r)  # linear strategies: the round's trained factor
    math = _ShardMath(rt, inputs, plan, config, federation, r, seconds, step, flush, noise_key, trains)
    yield from map_ordered(math.run, (math.load(job) for job in jobs), workers=rt.settings.aggregation_workers)


@dataclass
class _ShardMath:
    """How a shard's jobs load their inputs and compute their results (``_results``)."""

    rt: Runtime
    inputs: RoundInputs
    plan: Plan
    config: FederationConfig
    federation: str
    r: int
    seconds: dict[str, float]
    step: ServerStep | None
    flush: FlushStep | None
    noise_key: str  # DP: the federation's noise key ("" without DP)
    trains: Factor | None  # linear strategies: the round's trained factor

    def load(self, job: _Job) -> tuple[_Job, list[Any]]:
        """``job``'s inputs: the heads carried from round 0, the holders' extras, or their module updates."""
        t0 = time.perf_counter()
        plan = self.plan
        loaded: list[Any]
        if job.extra and plan.heads:
            loaded = [carried_heads(self.rt, plan.heads, plan.extras)[job.name]]
        elif job.extra:
            loaded = [self.inputs.extra(c, job.name) for c in job.holders]
            job.raw = loaded
        else:
            loaded = self._updates(job)
        self.seconds["fetch"] += time.perf_counter() - t0
        return job, loaded

    def _updates(self, job: _Job) -> list[ClientUpdate]:
        """A module's holders' updates as the math takes them (kept as uploaded in ``job.raw``)."""
        plan, inputs = self.plan, self.inputs
        if job.loaded:
            updates = job.loaded
        elif job.frozen is not None:
            factor, tensor, raw = job.frozen
            updates = [
                inputs.trained_update(c, job.name, w, factor, tensor, raw)
                for c, w in zip(job.holders, job.weights, strict=True)
            ]
        else:
            updates = [inputs.update(c, job.name, w) for c, w in zip(job.holders, job.weights, strict=True)]
        if job.frame is not None:  # Fed-SB: the index spans lora_R as both factors; the frame is published
            updates = [_in_frame(u, job.frame) for u in updates]
        job.loaded, job.raw = None, updates
        if plan.dp and _linear(plan):  # clipped through the weights, against each client's base (dp_linear)
            return updates
        if plan.dp and plan.flush_lr:
            # dp_release weighs every update 1/quorum; a DP flush's are its fixed clipped weights (flush.py)
            updates = [
                dataclasses.replace(u, scaling=u.scaling * self.config.quorum * plan.weights[c])
                for c, u in zip(job.holders, updates, strict=True)
            ]
        # a flush's clip factors are in its weights (against each delta's own base), never on the upload
        clips = {} if plan.flush_lr else plan.clip
        return [
            _clipped(u, clips.get(f"{c}|{job.name}"), self.trains) for c, u in zip(job.holders, updates, strict=True)
        ]

    def run(self, work: tuple[_Job, list[Any]]) -> tuple[_Job, Any, float]:
        """``job``'s result from its inputs, then a buffered flush's and a server step's (with the time taken)."""
        job, loaded = work
        t0 = time.perf_counter()
        result = self._aggregate(job, loaded)
        if self.flush is not None and job.extra:
            if not (self.plan.dp and job.holders):  # a DP head's release is already version v + 1's head
                result = self.flush.extra(job.name, job.holders, result)
        elif self.flush is not None and not (self.plan.dp and _linear(self.plan)):  # a linear DP release flushes
            result = self.flush.module(job.name, job.holders, job.absent, result, self.trains)
        if self.step is not None and job.extra and self.plan.heads:
            result = (result, {})  # --personal-heads: the published head is round 0's, never stepped
        elif self.step is not None:  # the server optimiser's step on the exact aggregate (workers/server_step.py)
            result = self.step.extra(job.name, result) if job.extra else self.step.module(job.name, result)
        return job, result, time.perf_counter() - t0

    def _aggregate(self, job: _Job, loaded: list[Any]) -> Any:
        """The holders' aggregate: an extra's weighted mean, a DP release, or the strategy's module result."""
        plan, config = self.plan, self.config
        if job.extra and plan.heads:
            return weighted_mean(loaded, [1.0])  # round 0's head as it is (checked finite)
        if job.extra and plan.dp:
            return self._dp_head(job, loaded)
        if job.extra:
            return weighted_mean(loaded, [plan.weights[c] for c in job.holders])  # checked finite
        if plan.dp and _linear(plan):
            return self._linear_dp(job, loaded)
        if plan.dp:
            return dp_release(
                loaded,
                quorum=config.quorum,
                clip_norm=config.clip_norm,
                noise_multiplier=config.dp_noise_multiplier,
                generator=noise_generator(self.noise_key, self.federation, self.r, job.name),
                out_rank=plan.out_rank or None,
                frozen_a=job.frozen_a,
            )
        result = aggregate_module(
            loaded, plan.strategy, absent_weight=job.strategy_absent, out_rank=_out_rank(plan), trains=self.trains
        )
        if self.rt.settings.round_cosines and job.frame is None:
            job.alignment = drift.alignment(job.name, loaded, job.strategy_absent)
        return result

    def _linear_dp(self, job: _Job, loaded: list[ClientUpdate]) -> ModuleResult:
        """A linear strategy's DP release of module ``job`` (``aggregation.dp_linear``): each holder's step of the
        trained factor against its base version, weighted ``c_i / K`` (a round: the clip factor from the plan) or
        the flush's fixed clipped ``q_i c_i``, plus the noise of the round's key; the frame as published."""
        plan, config, trains = self.plan, self.config, self.trains
        assert trains is not None  # a frozen shared frame always names what its clients train
        if self.flush is not None:
            assert plan.previous is not None
            current = _factors(self.flush.versions[plan.previous].modules.get(job.name), job.name, plan.previous)
            bases = [
                _factors(self.flush.versions[plan.bases[c]].modules.get(job.name), job.name, plan.bases[c])
                for c in job.holders
            ]
            weights = [plan.weights[c] for c in job.holders]  # q_i c_i (workers/flush.py dp_weights)
        else:
            current = _factors(job.frame or job.current, job.name, None)
            bases = [current] * len(job.holders)
            weights = [plan.clip.get(f"{c}|{job.name}", 1.0) / config.quorum for c in job.holders]
        uploads = []
        for u in loaded:
            x = factor_of(PreviousFactors(u.A, u.B, u.scaling, u.R), trains)
            assert x is not None  # Fed-SB's R is set by _in_frame
            uploads.append((x, float(u.scaling)))
        return linear_dp_release(
            current,
            uploads,
            bases,
            weights,
            trains=trains,
            sigma=release_sigma(config.dp_noise_multiplier, config.clip_norm, config.quorum),
            generator=noise_generator(self.noise_key, self.federation, self.r, job.name),
            lr=plan.flush_lr or 1.0,
        )

    def _dp_head(self, job: _Job, heads: list[torch.Tensor]) -> torch.Tensor:
        """A task head tensor under DP (``aggregation.dp.dp_head_release``): each holder's step against the head it
        trained from, weighted as the modules are (a round: ``c_i / K`` with the joint clip factor from the plan; a
        flush: its fixed clipped ``q_i c_i`` and η), plus the noise the round's key derives for this tensor."""
        plan, config = self.plan, self.config
        if self.flush is not None:
            assert plan.previous is not None
            start = self.flush.versions[plan.previous].extras.get(job.name)
            bases = [self.flush.versions[plan.bases[c]].extras.get(job.name) for c in job.holders]
            weights = [plan.weights[c] for c in job.holders]  # q_i c_i (workers/flush.py dp_weights)
        else:  # every client trained from the head the round starts from
            latest = self.rt.state.latest_complete(self.federation)
            start = previous_global(self.rt, self.federation, latest, [job.name]).extras.get(job.name)
            bases = [start] * len(job.holders)
            weights = [plan.clip.get(f"{c}|{job.name}", 1.0) / config.quorum for c in job.holders]
        return dp_head_release(
            start,
            heads,
            bases,
            weights,
            sigma=release_sigma(config.dp_noise_multiplier, config.clip_norm, config.quorum),
            generator=noise_generator(self.noise_key, self.federation, self.r, job.name),
            lr=plan.flush_lr or 1.0,
        )


def _factors(module: PreviousModule | None, name: str, version: int | None) -> PreviousFactors:
    """A published module as the math takes it; AggregationError when the version published none."""
    if module is None:
        where = "the round's start" if version is None else f"version {version}"
        raise AggregationError(f"module {name!r}: {where} published no adapter for it to move under DP")
    return PreviousFactors(module.A, module.B, module.scaling, module.R)


def _clipped(update: ClientUpdate, factor: float | None, trains: Factor | None = None) -> ClientUpdate:
    if factor is None or factor == 1.0:
        return update
    if trains == Factor.LORA_R and update.R is not None:  # Fed-SB: B and A frozen, the update is linear in R
        return dataclasses.replace(update, R=update.R * factor)
    if trains == Factor.LORA_A:  # B is frozen and shared this round: the update scales through A
        return dataclasses.replace(update, A=update.A * factor)
    return clip_update(update, factor)


def _in_frame(update: ClientUpdate, frame: PreviousModule) -> ClientUpdate:
    """A Fed-SB upload's R (read as both factors) between the published frame."""
    return ClientUpdate(A=frame.A, B=frame.B, R=update.A, scaling=update.scaling, weight=update.weight)


def _check_shape(job: _Job, result: ModuleResult) -> None:
    if int(result.A.shape[0]) != job.rank:
        raise AggregationError(
            f"module {job.name!r}: adapter rank {result.A.shape[0]} differs from the layout's "
            f"{job.rank} (engine and layout disagree)"
        )
