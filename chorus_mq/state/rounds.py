"""The round state machine over Redis. Each transition is one Lua script; Redis decides, not Celery."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import redis as redis_lib
from redis import Redis

from ..errors import ConfigError, FederationExists, StateCorrupt, UnknownFederation, UnknownRound
from ..ids import check_name
from ..names import INBOX_GROUP, CloseReason, RoundStatus, ScriptStatus
from ..strategy import strategy_spec
from .clients import ClientRegistry
from .config import FederationConfig
from .events import EventLog, prelude_args
from .protocol import Reply, opt_text, text, text_map
from .records import DeltaRecord, ManifestRef, RoundInfo, SnapshotRecord
from .redis_keys import FEDERATIONS, FederationKeys
from .scripts import Arg, Scripts
from .selection import check_progress, next_selected_round

__all__ = [
    "DeltaRecord",
    "FederationConfig",
    "ManifestRef",
    "ModelShapes",
    "RevokedDelta",
    "RoundInfo",
    "RoundState",
    "SnapshotRecord",
]

_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class RevokedDelta:
    """What revoking a client did to its delta in the current round ``round``.

    ``outcome``: ``evicted`` (it was in the open round: removed, ``delta_evicted`` published, ``n``
    deltas left), ``kept`` (the round was already aggregating it: the aggregation goes on with it), or
    ``none`` (no delta of the client in the current round).
    """

    round: int
    outcome: str
    sha256: str = ""
    n: int = 0


class ModelShapes(Protocol):
    """What ``create_federation`` needs of a model declaration (``adapters.ModelDecl`` fits)."""

    @property
    def modules(self) -> Mapping[str, tuple[int, int]]: ...

    @property
    def extras(self) -> Mapping[str, tuple[int, ...]]: ...


@contextmanager
def _typed(key: str) -> Iterator[None]:
    """Turn a WRONGTYPE error of a plain command on ``key`` into :class:`StateCorrupt` (nothing was changed)."""
    try:
        yield
    except redis_lib.ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise StateCorrupt(f"{key} holds another Redis type than chorus-mq writes there: {exc}") from None
        raise


def _shape_text(shape: tuple[int, ...], what: str) -> str:
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ConfigError(f"{what} must have positive integer dimensions, got {shape!r}")
    return ",".join(str(d) for d in shape)


def _parse_shape(raw: str, where: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in raw.split(","))
    except ValueError:
        raise StateCorrupt(f"{where}: {raw!r} is not a shape") from None


class RoundState:
    """Reads and transitions the rounds of every federation on one Redis.

    ``lease_s`` is the aggregation lease: a round's running task renews it, and the sweep
    reclaims a round whose lease ran out. ``maxlen`` bounds each events stream (approximately).
    Transitions return the script's :class:`Reply`; a key of the wrong type raises
    :class:`StateCorrupt` and changes nothing.
    """

    def __init__(self, redis: Redis, *, maxlen: int = 100_000, lease_s: int = 30):
        self.redis = redis
        self.maxlen = maxlen
        self.lease_s = lease_s
        self.scripts = Scripts(redis)

    def _args(self, federation: str, round_: int, now: float) -> list[Arg]:
        return prelude_args(federation, round_, self.maxlen, now)

    @staticmethod
    def _transition_keys(k: FederationKeys, r: int) -> list[str]:
        """The KEYS of every script that may end round ``r`` and open the next (see the prelude)."""
        return [k.meta, k.round(r), k.round(r + 1), k.events, k.deadlines, k.leases, k.clients, k.secrets]

    # -- federations -------------------------------------------------------------------------

    def create_federation(
        self,
        cfg: FederationConfig,
        decl: ModelShapes,
        *,
        initial: ManifestRef | tuple[str, str] | None = None,
        seed: str | None = None,
        now: float | None = None,
    ) -> Reply:
        """Create ``cfg.name`` with its declared modules and extras, and open round 1.

        ``initial`` (a ManifestRef or a ``(key, sha256)`` pair) makes round 0 a complete round whose
        manifest is the federation's starting adapter. ``seed`` (secret, workers-only; random by default)
        fixes the client draws. A configuration under which a round can wait on specific clients forever
        is refused (:func:`selection.check_progress`). Running it again with the same config is a no-op
        (status ``exists``); another config raises FederationExists.
        """
        check_progress(cfg)
        now = time.time() if now is None else now
        k = FederationKeys(cfg.name)
        if initial is not None and not isinstance(initial, ManifestRef):
            initial = ManifestRef(*initial)
        if not decl.modules:
            raise ConfigError("a federation needs its model's modules: give --base-model or --reference-adapter")
        modules: list[Arg] = []
        for name in sorted(decl.modules):
            shape = tuple(decl.modules[name])
            if len(shape) != 2:
                raise ConfigError(f"module {name} must be (d_out, d_in), got {shape!r}")
            modules += [_declared_name(name), _shape_text(shape, f"module {name}")]
        extras: list[Arg] = []
        for name in sorted(decl.extras):
            extras += [_declared_name(name), _shape_text(tuple(decl.extras[name]), f"extra tensor {name}")]
        config: list[Arg] = []
        for field, value in cfg.to_hash().items():
            config += [field, value]
        cycle = strategy_spec(cfg.strategy).trains
        if cycle:  # read by open_round (state/lua/_prelude.lua): each round's trainable factor
            config += ["trainable_cycle", ",".join(str(f) for f in cycle)]
        seed = secrets.token_hex(16) if seed is None else seed
        reply = self.scripts.create_federation(
            keys=[
                k.meta,
                k.modules,
                k.extras,
                k.inbox,
                k.events,
                k.deadlines,
                k.clients,
                k.secrets,
                k.round(0),
                k.round(1),
            ],
            args=[
                *self._args(cfg.name, 1, now),
                seed,
                secrets.token_hex(32),
                INBOX_GROUP,
                initial.key if initial else "",
                initial.sha256 if initial else "",
                cfg.clients_per_round,
                len(config) // 2,
                len(modules) // 2,
                len(extras) // 2,
                *config,
                *modules,
                *extras,
            ],
        )
        # after the script: a crash in between leaves a federation a re-run of create repairs
        self.redis.sadd(FEDERATIONS, cfg.name)
        if reply.status == ScriptStatus.EXISTS:
            stored = self.config(cfg.name)
            same_model = self.modules(cfg.name) == {m: tuple(s) for m, s in decl.modules.items()}
            if stored != cfg or not same_model:
                raise FederationExists(f"federation {cfg.name!r} already exists with another configuration")
        return reply

    def noise_key(self, federation: str) -> str:
        """The server-only secret the DP noise derives from (so a re-run releases identical noise)."""
        key = opt_text(self.redis.hget(FederationKeys(federation).secrets, "noise_key"))
        if not key:
            raise ConfigError(f"federation {federation!r} has no noise key; it was created incompletely")
        return key

    def federations(self) -> list[str]:
        """Every federation's name, sorted."""
        return sorted(text(f) for f in self.redis.smembers(FEDERATIONS))

    def meta(self, federation: str) -> dict[str, str]:
        """The raw ``meta`` hash; :class:`UnknownFederation` when there is none."""
        k = FederationKeys(federation)
        with _typed(k.meta):
            h = text_map(self.redis.hgetall(k.meta))
        if not h:
            raise UnknownFederation(f"no federation named {federation!r}; create it with `chorus-mq federation create`")
        return h

    def config(self, federation: str) -> FederationConfig:
        """The federation's configuration, typed."""
        return FederationConfig.from_hash(self.meta(federation))

    def current_round(self, federation: str) -> int:
        """The round clients upload to now (open or aggregating)."""
        return int(self.meta(federation)["current_round"])

    def latest_complete(self, federation: str) -> int | None:
        """The newest complete round: 0 is the initial adapter's round 0; None when there is none yet."""
        latest = int(self.meta(federation).get("latest_complete", 0))
        if latest == 0 and not self.redis.exists(FederationKeys(federation).round(0)):
            return None
        return latest

    def modules(self, federation: str) -> dict[str, tuple[int, int]]:
        """Declared module -> (d_out, d_in)."""
        k = FederationKeys(federation)
        with _typed(k.modules):
            raw = text_map(self.redis.hgetall(k.modules))
        out: dict[str, tuple[int, int]] = {}
        for name, shape in raw.items():
            dims = _parse_shape(shape, f"{k.modules} {name}")
            if len(dims) != 2:
                raise StateCorrupt(f"{k.modules} {name}: {shape!r} is not d_out,d_in")
            out[name] = (dims[0], dims[1])
        return out

    def extras(self, federation: str) -> dict[str, tuple[int, ...]]:
        """Declared extra tensor (e.g. the task head every delta must carry) -> shape."""
        k = FederationKeys(federation)
        with _typed(k.extras):
            raw = text_map(self.redis.hgetall(k.extras))
        return {name: _parse_shape(shape, f"{k.extras} {name}") for name, shape in raw.items()}

    # -- rounds ------------------------------------------------------------------------------

    def round(self, federation: str, r: int) -> RoundInfo:
        """Round ``r``; :class:`UnknownRound` when it does not exist (yet)."""
        k = FederationKeys(federation)
        with _typed(k.round(r)):
            h = text_map(self.redis.hgetall(k.round(r)))
        if not h:
            self.meta(federation)
            raise UnknownRound(f"federation {federation!r} has no round {r}")
        return RoundInfo.from_hash(r, h)

    def rounds(self, federation: str) -> list[RoundInfo]:
        """Rounds 1..current (one round trip). Round 0, the initial adapter, is ``round(F, 0)``."""
        current = self.current_round(federation)
        k = FederationKeys(federation)
        with self.redis.pipeline(transaction=False) as pipe:
            for r in range(1, current + 1):
                pipe.hgetall(k.round(r))
            raw = pipe.execute(raise_on_error=False)
        out: list[RoundInfo] = []
        for r, h in enumerate(raw, start=1):
            if isinstance(h, Exception):
                raise StateCorrupt(f"{k.round(r)} cannot be read as a round: {h}")
            if h:
                out.append(RoundInfo.from_hash(r, text_map(h)))
        return out

    def registered_sha(self, federation: str, r: int, client: str) -> str | None:
        """The sha256 of ``client``'s delta in round ``r``, if it registered one."""
        return opt_text(self.redis.hget(FederationKeys(federation).round(r), f"sha:{check_name(client, 'client id')}"))

    def registered_shas(self, federation: str, r: int, client: str) -> list[str]:
        """The sha256 of every delta ``client`` registered in round ``r`` (a buffered client may hold up to
        ``--max-per-client-per-flush``)."""
        return self.round(federation, r).shas_of(check_name(client, "client id"))

    def deltas(self, federation: str, r: int) -> dict[str, DeltaRecord]:
        """The round's registered deltas, by term (sorted): the client, or ``client#k`` for a buffered
        client's k-th delta in one buffer (``records.term_key``)."""
        k = FederationKeys(federation)
        with _typed(k.deltas(r)):
            raw = text_map(self.redis.hgetall(k.deltas(r)))
        return {client: DeltaRecord.from_json(rec) for client, rec in sorted(raw.items())}

    def next_selected_round(self, federation: str, client: str, after_round: int) -> int | None:
        """The first round after ``after_round`` that will draw ``client``, given today's registry (None: none soon).

        Operators and workers only: the answer comes from the secret seed, and telling it to a client
        would let it predict its draws.
        """
        meta = self.meta(federation)
        k = int(meta.get("clients_per_round", 0))
        active = ClientRegistry(self.redis, federation).active()
        return next_selected_round(self.selection_seed(federation), client, frozenset(active), k, after_round)

    def selection_seed(self, federation: str) -> str:
        """The secret seed of the client draws (in ``secrets``; a federation created before it moved there
        still has it in ``meta``)."""
        k = FederationKeys(federation)
        with _typed(k.secrets):
            seed = opt_text(self.redis.hget(k.secrets, "selection_seed"))
        return seed if seed is not None else self.meta(federation).get("selection_seed", "")

    # -- transitions -------------------------------------------------------------------------

    def register(
        self,
        federation: str,
        r: int,
        record: DeltaRecord,
        now: float | None = None,
        *,
        inbox: tuple[str, str] | None = None,
    ) -> Reply:
        """Register a validated delta in round ``r``; ``inbox`` (stream key, entry id) is the record it came
        from, retired in the same transition when the verdict accepts it.

        Status: accepted | fired (this call fired the quorum; ``epoch`` is the aggregation's) |
        duplicate | conflict | evicted | closed | not_selected | no_round, and for a buffered federation
        stale | future_base | no_base (detail: latest_complete) (see register_delta.lua).
        """
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        stream, entry = inbox or (k.inbox, "")
        return self.scripts.register_delta(
            keys=[
                k.round(r),
                k.deltas(r),
                k.events,
                k.deadlines,
                k.leases,
                stream,
                k.meta,
                k.round(r + 1),
                k.clients,
                k.secrets,
                k.ledger,
            ],
            args=[
                *self._args(federation, r, now),
                record.client_id,
                record.sha256,
                record.to_json(),
                record.upload_id,
                repr(now + self.lease_s),
                entry,
                INBOX_GROUP,
                "" if record.base_version is None else record.base_version,
            ],
        )

    def close(
        self, federation: str, r: int, mode: CloseReason | str = CloseReason.MANUAL, now: float | None = None
    ) -> Reply:
        """Close an open round by hand (``manual``) or because its deadline passed (``deadline``).

        Status: fired | not_due | noop | too_few | extended | expired (see close_round.lua).
        """
        mode = CloseReason(mode)
        if mode is CloseReason.QUORUM:
            raise ConfigError("a round closes by quorum only when a delta is registered; close it manual or deadline")
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.close_round(
            keys=self._transition_keys(k, r),
            args=[*self._args(federation, r, now), mode.value, repr(now + self.lease_s)],
        )

    def finalize(
        self,
        federation: str,
        r: int,
        epoch: int,
        manifest_key: str,
        manifest_sha: str,
        summary: Mapping[str, Any] | None = None,
        *,
        now: float | None = None,
    ) -> Reply:
        """Commit round ``r`` under ``epoch`` (compare-and-set) with its manifest; opens the next round.

        Status: ok | already | stale | bad_state. ``summary`` is merged into the ``round_complete`` event.
        """
        now = time.time() if now is None else now
        ManifestRef(manifest_key, manifest_sha)  # validates both
        k = FederationKeys(federation)
        return self.scripts.finalize(
            keys=self._transition_keys(k, r),
            args=[
                *self._args(federation, r, now),
                int(epoch),
                manifest_key,
                manifest_sha,
                json.dumps(dict(summary or {})),
            ],
        )

    def fail(self, federation: str, r: int, epoch: int, reason: str, now: float | None = None) -> Reply:
        """Fail round ``r``'s aggregation under ``epoch`` and open the next round. Status: ok | stale | bad_state."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.fail_round(
            keys=self._transition_keys(k, r), args=[*self._args(federation, r, now), int(epoch), reason]
        )

    def reclaim(self, federation: str, r: int, now: float | None = None) -> Reply:
        """Take over an aggregation whose lease ran out, under a new epoch. Status: reclaimed | not_due | noop."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.reclaim(
            keys=[k.round(r), k.leases, k.events], args=[*self._args(federation, r, now), repr(now + self.lease_s)]
        )

    def redispatch(self, federation: str, r: int, now: float | None = None) -> Reply:
        """An expired lease: re-send the epoch's missing tasks (``resend``: the lease is extended, same epoch)
        unless the last re-send made no progress (``stuck``: reclaim). Status: resend | stuck | not_due | noop."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.redispatch(
            keys=[k.round(r), k.leases, k.plan(r), k.shards(r)],
            args=[*self._args(federation, r, now), repr(now + self.lease_s)],
        )

    def renew(self, federation: str, r: int, epoch: int, now: float | None = None) -> bool:
        """Renew the lease of round ``r``'s running task; False when ``epoch`` no longer holds it (stop working)."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        reply = self.scripts.renew_lease(
            keys=[k.round(r), k.leases], args=[*self._args(federation, r, now), int(epoch), repr(now + self.lease_s)]
        )
        return reply.status == ScriptStatus.RENEWED

    def extend_lease(self, federation: str, r: int, now: float | None = None) -> Reply:
        """Push an aggregating round's lease on without a new epoch (the sweep, when the fleet is busy).

        Status: extended | noop.
        """
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.extend_lease(
            keys=[k.round(r), k.leases], args=[*self._args(federation, r, now), repr(now + self.lease_s)]
        )

    def evict(self, federation: str, r: int, client: str, reason: str, now: float | None = None) -> Reply:
        """Operator: remove ``client``'s deltas (each of its terms) from open round ``r``.

        Status: evicted (detail: the sha256s, comma-separated) | noop | closed | no_round."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.evict_delta(
            keys=[k.round(r), k.deltas(r), k.events],
            args=[*self._args(federation, r, now), check_name(client, "client id"), reason],
        )

    def evict_revoked(self, federation: str, client: str, now: float | None = None) -> RevokedDelta:
        """A revoked client's delta leaves the open current round (the fenced ``evict`` transition, event
        ``delta_evicted``); an aggregating round keeps it (its quorum was counted with it)."""
        r = self.current_round(federation)
        reply = self.evict(federation, r, client, "client revoked by the operator", now)
        if reply.status == ScriptStatus.EVICTED:
            return RevokedDelta(r, "evicted", reply.detail, reply.n)
        sha = self.registered_sha(federation, r, client)
        if reply.status == ScriptStatus.CLOSED and sha is not None:
            return RevokedDelta(r, "kept", sha, reply.n)
        return RevokedDelta(r, "none", n=reply.n)

    def abort(self, federation: str, r: int, reason: str, now: float | None = None) -> Reply:
        """Operator: end open or aggregating round ``r`` as ``aborted`` (new epoch) and open the next.

        Status: aborted | bad_state | no_round.
        """
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        return self.scripts.abort_round(
            keys=self._transition_keys(k, r), args=[*self._args(federation, r, now), reason]
        )

    # -- the round's plan and shards ---------------------------------------------------------

    def set_plan(self, federation: str, r: int, plan_json: str) -> str:
        """Store round ``r``'s plan unless one is stored already; returns the stored one (first wins)."""
        key = FederationKeys(federation).plan(r)
        with _typed(key):
            prev = opt_text(self.redis.set(key, plan_json, nx=True, get=True))
        return plan_json if prev is None else prev

    def plan(self, federation: str, r: int) -> str | None:
        """Round ``r``'s plan (JSON), None before the first round task set it."""
        key = FederationKeys(federation).plan(r)
        with _typed(key):
            return opt_text(self.redis.get(key))

    def shard_done(
        self, federation: str, r: int, k: int, total: int, result_json: str, *, epoch: int, now: float | None = None
    ) -> Reply:
        """Record shard ``k`` of ``total`` computed under ``epoch`` (write-once). ``n``: shards done;
        ``detail == "last"`` for exactly one call.

        Status: recorded | duplicate | conflict | stale. A redelivered or reclaimed shard gets
        ``duplicate`` and never ``last``: after a reclaim, compare ``len(shards())`` with ``total``. A run
        under another epoch than the round's (the sweep reclaimed it) is ``stale`` (detail ``epoch``) and
        changes nothing.
        """
        if not 0 <= k < total:
            raise ConfigError(f"shard index {k} is outside 0..{total - 1}")
        now = time.time() if now is None else now
        keys = FederationKeys(federation)
        return self.scripts.shard_done(
            keys=[keys.round(r), keys.shards(r), keys.events],
            args=[*self._args(federation, r, now), int(k), int(total), result_json, int(epoch)],
        )

    def shards(self, federation: str, r: int) -> dict[int, str]:
        """Shard index -> result (JSON) of every shard done."""
        key = FederationKeys(federation).shards(r)
        with _typed(key):
            raw = text_map(self.redis.hgetall(key))
        return {int(i): result for i, result in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def forget_round_work(self, federation: str, r: int) -> bool:
        """Drop a complete round's plan and shard results (its manifest holds both); False unless complete."""
        if self.round(federation, r).state != RoundStatus.COMPLETE:
            return False
        k = FederationKeys(federation)
        self.redis.delete(k.plan(r), k.shards(r))
        return True

    def collect_round_work(self, federation: str) -> list[int]:
        """Drop the plan and shard keys of every round before the current one (each has ended: complete,
        failed, expired or aborted) not collected yet; returns the rounds looked at. A commit that died
        between finalize and its own clean-up leaves them; so does a failed round. Idempotent, and safe
        to run twice at once (DEL; the cursor only moves forward)."""
        k = FederationKeys(federation)
        current = self.current_round(federation)
        with _typed(k.collected):
            start = int(opt_text(self.redis.get(k.collected)) or 0)
        rounds = list(range(max(1, start), current))
        if not rounds:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for r in rounds:
                pipe.delete(k.plan(r), k.shards(r))
            pipe.execute()
        # the cursor: the first round not collected yet (a concurrent sweep writing a smaller one costs a
        # few repeated DELs, never a leak)
        self.redis.set(k.collected, current)
        return rounds

    def opt_cursor(self, federation: str) -> int:
        """The first round whose server optimiser state objects may still exist (0 when none was collected)."""
        k = FederationKeys(federation)
        with _typed(k.opt_collected):
            return int(opt_text(self.redis.get(k.opt_collected)) or 0)

    def advance_opt_cursor(self, federation: str, r: int) -> None:
        """Record that the states of every round before ``r`` are collected (a concurrent writer of a smaller
        value costs a few repeated reads, never a leak)."""
        self.redis.set(FederationKeys(federation).opt_collected, r)

    def keys(self, federation: str) -> FederationKeys:
        """The key names of ``federation`` (for what the workers lock or inspect directly)."""
        return FederationKeys(federation)

    def events(self, federation: str) -> EventLog:
        """``federation``'s event log, on this state's connection, stream bound and scripts."""
        return EventLog(self.redis, federation, self.maxlen, self.scripts)

    # -- snapshots ---------------------------------------------------------------------------

    def add_snapshot(self, federation: str, record: SnapshotRecord | str) -> SnapshotRecord:
        """Record a snapshot (for ``record.round``) unless one is recorded for that round; returns the stored one."""
        snap = record if isinstance(record, SnapshotRecord) else SnapshotRecord.from_json(record)
        key = FederationKeys(federation).snapshots
        with _typed(key):
            if self.redis.hsetnx(key, str(snap.round), snap.to_json()):
                return snap
            stored = opt_text(self.redis.hget(key, str(snap.round)))
        return snap if stored is None else SnapshotRecord.from_json(stored)

    def request_compaction(self, federation: str, r: int, retry_s: float) -> bool:
        """Whether the caller should enqueue round ``r``'s compaction: True once per ``retry_s`` (the sweep)."""
        key = FederationKeys(federation).compaction_request(r)
        with _typed(key):
            return bool(self.redis.set(key, "1", nx=True, px=max(1, int(retry_s * 1000))))

    def snapshots(self, federation: str) -> dict[int, SnapshotRecord]:
        """Round -> snapshot, oldest first."""
        key = FederationKeys(federation).snapshots
        with _typed(key):
            raw = text_map(self.redis.hgetall(key))
        return {int(r): SnapshotRecord.from_json(rec) for r, rec in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    # -- the inbox's rejections --------------------------------------------------------------

    def count_rejected(self, federation: str, code: str) -> int:
        """Count one inbox record dropped before authentication (logged and counted, never published)."""
        if not _CODE.fullmatch(code):
            raise ConfigError(f"rejection code {code!r} must be a short snake_case word")
        key = FederationKeys(federation).rejected
        with _typed(key):
            return int(self.redis.hincrby(key, code, 1))

    def rejected(self, federation: str) -> dict[str, int]:
        """Reason code -> records dropped before authentication."""
        key = FederationKeys(federation).rejected
        with _typed(key):
            return {code: int(n) for code, n in sorted(text_map(self.redis.hgetall(key)).items())}

    # -- the sweep ---------------------------------------------------------------------------

    def due(self, federation: str, now: float | None = None) -> tuple[list[int], list[int]]:
        """Rounds whose deadline passed, and aggregations whose lease ran out."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        with _typed(k.deadlines):
            deadlines = self.redis.zrangebyscore(k.deadlines, "-inf", now)
        with _typed(k.leases):
            leases = self.redis.zrangebyscore(k.leases, "-inf", now)
        return _members(deadlines), _members(leases)


def _members(raw: list[Any]) -> list[int]:
    return [int(opt_text(member) or "") for member in raw]


def _declared_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"declared tensor name {name!r} must be a non-empty string without whitespace")
    return name
