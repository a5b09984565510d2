"""Ingest one inbox record: authenticate, fetch, re-hash, bound, validate against the declared model,
index, register (atomically) and maybe fire the quorum.

Order matters: everything cheap and everything that needs no bytes comes first (parse, identity,
round, size), then the header checks against the federation's declared model (before any tensor
data is read), then the full read (finite values, per-module digests and update norms).

The inbox entry the record came from stays pending in its consumer group until the verdict is
stored, and is retired in the same Lua transition that stores it (``register_delta`` for an
acceptance, ``judge`` for everything else): a worker or Redis dying before that leaves the entry
for the pump to claim again; after it, a redelivered task finds nothing to redo. A (client,
sha256) judged once in a round is answered from that verdict without fetching the object again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..adapters import DeltaFile, DeltaIndex, ModelDecl, build_index, check_delta
from ..errors import (
    AuthError,
    ChorusError,
    ConfigError,
    DeltaEvicted,
    DuplicateDelta,
    IncompatibleDelta,
    InvalidAdapter,
    NotSelected,
    ObjectExists,
    ObjectMissing,
    RoundClosed,
    ServiceUnavailable,
    StaleDelta,
    TooLarge,
    Unauthenticated,
    UnknownFederation,
    UnknownRound,
    UpdateTooLarge,
)
from ..ids import check_name
from ..layout import accepted_key, delta_key, index_key
from ..messages import IngestMessage
from ..names import RoundStatus, ScriptStatus, Task
from ..settings import Settings
from ..state import FederationConfig, FederationKeys, Inbox
from ..state.protocol import Reply, opt_text
from ..state.records import term_client
from ..state.rounds import DeltaRecord
from . import auth
from .declared import Declared, declared_model, present_bitmap, tensor_bytes
from .dispatch import Dispatcher
from .frozen import check_frozen, check_upload_kind
from .metrics import METRICS
from .runtime import Runtime

log = logging.getLogger(__name__)

#: the delta (or its message) is bad: tell the client, never retry
REJECTABLE = (
    ConfigError,
    InvalidAdapter,
    UnknownRound,
    RoundClosed,
    NotSelected,
    DuplicateDelta,
    DeltaEvicted,
    StaleDelta,
    ObjectMissing,
    AuthError,
)


#: a remembered verdict on a (client, sha256) lives this long (a round's worth of repeats)
VERDICT_TTL_S = 7 * 24 * 3600
#: bytes per element of the widest dtype a delta may hold (F64)
_WIDEST = 8
#: the safetensors length prefix
_PREFIX = 8


class _Remembered(ChorusError):
    """A verdict given before on the same bytes, given again without fetching them."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def max_delta_size(decl: ModelDecl, settings: Settings) -> int:
    """The largest object a delta for this declared model can be: every declared module at
    ``CHORUS_MAX_RANK`` in the widest dtype, every declared extra, the largest header allowed; never
    above ``CHORUS_MAX_DELTA_BYTES``."""
    factors = sum(settings.max_rank * (d_out + d_in) for d_out, d_in in decl.modules.values())
    extras = sum(math.prod(shape) for shape in decl.extras.values())
    bound = _PREFIX + settings.max_header_bytes + _WIDEST * (factors + extras)
    return min(settings.max_delta_bytes, bound)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    federation: str
    round: int | None
    client_id: str
    upload_id: str
    status: str  # accepted | duplicate | fired | <error code>
    reason: str = ""
    epoch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(
    rt: Runtime, federation: str, inbox_client: str | None, entry_id: str, raw: Any, dispatch: Dispatcher
) -> Verdict:
    """Run the whole ingest of one inbox record (from ``inbox_client``'s own inbox, or the federation-wide one
    when None); transient failures raise so Celery retries."""
    try:
        check_name(federation, "federation name")
        rt.state.meta(federation)
        inbox = Inbox(rt.redis, federation, inbox_client)
    except (ConfigError, UnknownFederation) as exc:  # no such federation: nobody to tell, nothing to count
        log.warning("dropped inbox record %s: %s", entry_id, exc)
        METRICS.deltas.labels(outcome="dropped", code=exc.code).inc()
        return Verdict(False, federation, None, "", "", exc.code, str(exc))
    try:
        msg = parse_record(federation, inbox_client, raw, rt.settings.max_inbox_record_bytes)
    except (InvalidAdapter, Unauthenticated) as exc:
        return _drop(rt, inbox, entry_id, None, exc)
    r: int | None = msg.round
    try:
        r = msg.round or rt.state.current_round(msg.federation)
        return _ingest(rt, inbox, entry_id, msg, r, dispatch)
    except Unauthenticated as exc:
        return _drop(rt, inbox, entry_id, msg, exc)
    except UnknownFederation as exc:
        return _drop(rt, inbox, entry_id, msg, exc)
    except (*REJECTABLE, _Remembered) as exc:
        return _reject(rt, inbox, entry_id, msg, r or 0, exc)


def parse_record(federation: str, inbox_client: str | None, raw: Any, max_bytes: int) -> IngestMessage:
    """The message an inbox record carries, held to the inbox it was found in (the pump and the ingest task
    both parse with this); :class:`InvalidAdapter` for junk, :class:`Unauthenticated` for a record that
    claims another sender than its inbox's owner."""
    if isinstance(raw, str):
        msg = IngestMessage.from_record({"m": raw}, max_bytes)
    else:
        msg = IngestMessage.parse(raw)
    if msg.federation != federation:
        raise Unauthenticated(f"a record in {federation!r}'s inbox names federation {msg.federation!r}")
    if inbox_client is not None and msg.client_id != inbox_client:
        raise Unauthenticated(f"a record in {inbox_client!r}'s inbox claims to be from {msg.client_id!r}")
    try:
        check_name(msg.client_id, "client id")
    except ConfigError as exc:
        raise Unauthenticated(str(exc)) from None
    return msg


def _remembered(rt: Runtime, msg: IngestMessage, r: int, inbox: Inbox, entry_id: str) -> Verdict | None:
    """The verdict on this (client, sha256) in round ``r`` when it was judged before: an acceptance is
    registered again (a duplicate, retiring the entry), a rejection raised again; None: judge it."""
    keys = FederationKeys(msg.federation)
    # the term holding these bytes: the client's own, or ``client#k`` for a buffered client's k-th delta
    term = msg.client_id
    for field, sha in rt.redis.hscan_iter(keys.round(r), match=f"sha:{msg.client_id}*"):
        name = field.decode() if isinstance(field, bytes) else field
        value = sha.decode() if isinstance(sha, bytes) else sha
        if value == msg.sha256 and term_client(name[4:]) == msg.client_id:
            term = name[4:]
    raw = opt_text(rt.redis.hget(keys.deltas(r), term))
    if raw is not None:
        record = DeltaRecord.from_json(raw)
        if record.sha256 == msg.sha256 and record.size == msg.size:
            record = replace(record, upload_id=msg.upload_id)
            reply = rt.state.register(msg.federation, r, record, inbox=(inbox.key, entry_id))
            if reply.status == ScriptStatus.DUPLICATE:
                METRICS.deltas.labels(outcome="duplicate", code="remembered").inc()
                return Verdict(True, msg.federation, r, msg.client_id, msg.upload_id, reply.status)
    known = opt_text(rt.redis.hget(keys.verdicts(r), f"{msg.client_id}|{msg.sha256}"))
    if known is not None:
        try:
            verdict = json.loads(known)
            size, code, reason = int(verdict["size"]), str(verdict["code"]), str(verdict["reason"])
        except (ValueError, KeyError, TypeError):
            return None  # not what a worker wrote: judge it afresh
        if size == msg.size:
            METRICS.deltas.labels(outcome="rejected", code="remembered").inc()
            raise _Remembered(code, reason)
    return None


def _remember(rt: Runtime, msg: IngestMessage, r: int, exc: ChorusError) -> None:
    """Keep a verdict that follows from the bytes alone (they hashed to the claimed sha256)."""
    key = FederationKeys(msg.federation).verdicts(r)
    value = json.dumps({"size": msg.size, "code": getattr(exc, "code", "rejected"), "reason": str(exc)})
    with rt.redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, f"{msg.client_id}|{msg.sha256}", value)
        pipe.expire(key, VERDICT_TTL_S)
        pipe.execute()


def _ingest(rt: Runtime, inbox: Inbox, entry_id: str, msg: IngestMessage, r: int, dispatch: Dispatcher) -> Verdict:
    started = time.perf_counter()
    config = rt.state.config(msg.federation)
    r = auth.verify(rt, msg, r)
    if msg.dataset_size is not None and msg.dataset_size > rt.settings.max_dataset_size:
        raise InvalidAdapter(
            f"dataset size {msg.dataset_size:g} is over the limit of "
            f"{rt.settings.max_dataset_size:g} (CHORUS_MAX_DATASET_SIZE)"
        )
    msg.check_report(config.labels, r, rt.settings.max_dataset_size)
    decl = declared_model(rt, msg.federation, config)
    cap = max_delta_size(decl.decl, rt.settings)
    if msg.size > cap:
        raise TooLarge(
            f"the message says the object is {msg.size} bytes; a delta of this federation's declared model "
            f"is at most {cap} bytes (every declared module at rank CHORUS_MAX_RANK={rt.settings.max_rank})"
        )
    # one worker at a time fetches a given object; the others then find its verdict. The lock lasts as long
    # as an entry may wait before it is claimed again: a dead holder delays the next try no further
    hold = rt.settings.inbox_claim_idle_s
    lock = rt.redis.lock(
        FederationKeys(msg.federation).fetch_lock(msg.client_id, msg.sha256), timeout=hold, blocking_timeout=hold
    )
    if not lock.acquire():
        raise ServiceUnavailable(f"another worker is still judging {msg.client_id}'s object {msg.sha256[:12]}...")
    try:
        remembered = _remembered(rt, msg, r, inbox, entry_id)
        if remembered is not None:
            return remembered
        if config.buffered:
            r = buffered_round(rt, msg, r, config)
        _precheck_round(rt, msg, r)
        if config.scaffold:
            _check_lr_sum(msg)  # before any download: the message alone says it
        index, size, etag = _fetch_and_check(rt, msg, r, decl, cap, config)
        if config.scaffold:
            _check_scaffold_ranks(rt, msg.federation, index)
        return _register(rt, inbox, entry_id, msg, r, config, decl.modules, index, size, etag, dispatch, started)
    finally:
        try:
            lock.release()
        except Exception:  # expired or Redis gone: the lock times out on its own
            log.debug("fetch lock of %s/%s already released", msg.client_id, msg.sha256[:12])


def _fetch_and_check(
    rt: Runtime, msg: IngestMessage, r: int, decl: Declared, cap: int, config: FederationConfig
) -> tuple[DeltaIndex, int, str | None]:
    """Fetch (once), re-hash and validate the object; a verdict that follows from its bytes is remembered."""
    source = delta_key(msg.federation, msg.client_id, msg.sha256)
    # file:// hashes the object in place; s3:// downloads it to the spool. The size limit is checked first.
    with rt.store.local_copy(source, expected_sha256=msg.sha256, max_bytes=cap, spool_dir=rt.spool) as local:
        etag = local.etag
        size = local.path.stat().st_size
        METRICS.fetches.inc()
        log.info("fetched %s (%d bytes) for round %s", source, size, r)
        if size != msg.size:
            raise InvalidAdapter(f"object is {size} bytes but the message says {msg.size}")
        try:  # the bytes hash to the claimed sha256: what they fail now, they fail for good
            with DeltaFile.open(
                local.path, max_header_bytes=rt.settings.max_header_bytes, max_tensors=decl.decl.max_tensors
            ) as delta:
                if decl.heads_local and delta.structure.extras:
                    raise IncompatibleDelta(
                        f"federation {msg.federation!r} keeps every client's task head local (--personal-heads): "
                        f"a delta must not carry it ({', '.join(sorted(delta.structure.extras))}); upload the "
                        "LoRA modules only (chorus-mq train does)"
                    )
                check_delta(
                    delta,
                    decl.uploads,
                    max_pattern_entries=rt.settings.max_pattern_entries,
                    max_rank=rt.settings.max_rank,
                )  # header only: before any tensor data is read
                check_upload_kind(str(config.strategy), delta.structure.sandwich, len(delta.structure.modules))
                index = build_index(delta)  # reads every tensor once: finite, digests, norms
            _check_norms(index, config)
            # ffa-lora, rolora: the frozen factor is the round's published one, byte for byte; fed-sb: R's rank
            base = msg.base_version if config.buffered else None  # a buffered delta trained from its base
            check_frozen(rt, msg.federation, r, str(config.strategy), index, local.path, base)
        except InvalidAdapter as exc:
            _remember(rt, msg, r, exc)
            raise
    METRICS.bytes_in.labels(task="ingest").inc(size)

    return index, size, etag


def _register(
    rt: Runtime,
    inbox: Inbox,
    entry_id: str,
    msg: IngestMessage,
    r: int,
    config: FederationConfig,
    modules: tuple[str, ...],
    index: DeltaIndex,
    size: int,
    etag: str | None,
    dispatch: Dispatcher,
    started: float,
) -> Verdict:

    # the worker's own copy, out of the client's writable prefix, and the index shards will read by
    source = delta_key(msg.federation, msg.client_id, msg.sha256)
    key = accepted_key(msg.federation, msg.client_id, msg.sha256)
    try:
        rt.store.copy(source, key, if_etag=etag)  # the bytes that were verified, not a swapped object
    except ObjectExists:
        pass  # content-addressed: an earlier delivery copied the same bytes
    index_bytes = index.to_json()
    ikey = index_key(msg.federation, msg.client_id, msg.sha256)
    try:
        rt.store.put_bytes(ikey, index_bytes, write_once=True)
    except ObjectExists:
        # an earlier delivery indexed the same bytes; its norms may differ in the last bit (another
        # host's BLAS), so the stored index is the one every reader checks against
        index_bytes = rt.store.get_bytes(ikey)
        index = DeltaIndex.from_json(index_bytes)
    record = _record(msg, size, key, ikey, index_bytes, index, modules)
    reply = rt.state.register(msg.federation, r, record, inbox=(inbox.key, entry_id))
    for _ in range(_BUFFER_RETRIES if config.buffered else 0):
        # the buffer flushed between reading the current round and registering: join the next one
        if reply.status != ScriptStatus.CLOSED or rt.state.current_round(msg.federation) == r:
            break
        r = rt.state.current_round(msg.federation)
        reply = rt.state.register(msg.federation, r, record, inbox=(inbox.key, entry_id))
    check_buffered_reply(msg, reply, config)
    if reply.status == ScriptStatus.CONFLICT and config.buffered:
        limit = config.max_per_client_per_flush
        held = "a delta" if limit == 1 else f"{limit} deltas"
        raise DuplicateDelta(
            f"client {msg.client_id!r} already has {held} (the last sha256 {reply.detail[:12]}...) in the open "
            f"buffer (round {r}); --max-per-client-per-flush is {limit}: upload again once round {r} is aggregating"
        )
    if reply.status == ScriptStatus.CONFLICT:
        raise DuplicateDelta(
            f"client {msg.client_id!r} already has a different delta (sha256 {reply.detail[:12]}...) in round {r}"
        )
    if reply.status == ScriptStatus.CLOSED:
        raise RoundClosed(_closed_reason(r, reply.detail))
    if reply.status == ScriptStatus.EVICTED:
        raise DeltaEvicted(
            f"the operator evicted this delta (sha256 {msg.sha256[:12]}...) from round {r}; it cannot "
            "come back into this round: upload another delta, or to the next round"
        )
    if reply.status == ScriptStatus.NO_ROUND:
        raise UnknownRound(f"federation {msg.federation!r} has no round {r}")
    if reply.status == ScriptStatus.NOT_SELECTED:
        raise NotSelected(_not_selected_reason(rt, msg, r))
    if reply.status == ScriptStatus.FIRED:
        dispatch.send(Task.ROUND, msg.federation, r, reply.epoch)
    _discard_upload(rt, msg)
    METRICS.deltas.labels(outcome=reply.status, code="ok").inc()
    METRICS.phase_seconds.labels(phase="ingest").observe(time.perf_counter() - started)
    log.info("delta %s/%s round %s: %s (%d/%s)", msg.federation, msg.client_id, r, reply.status, reply.n, config.quorum)
    return Verdict(True, msg.federation, r, msg.client_id, msg.upload_id, reply.status, epoch=reply.epoch)


#: how often a buffered delta follows the buffers that flush while it is registered
_BUFFER_RETRIES = 5


def buffered_round(rt: Runtime, msg: IngestMessage, r: int, config: FederationConfig) -> int:
    """A buffered delta's round: the open buffer (the one the nonce pinned, if still open; the ledger keeps a
    delta out of two flushes wherever it lands). Refuses, before any download, an upload that names a round or
    no base version, and a base version older than max_staleness or not yet published."""
    config.check_upload(msg.round, msg.base_version)
    latest = rt.state.latest_complete(msg.federation) or 0
    assert msg.base_version is not None  # check_upload
    problem = staleness_problem(msg, latest, config)
    if problem:
        raise StaleDelta(problem)
    base = msg.base_version
    if base > 0 or rt.state.latest_complete(msg.federation) is not None:
        # a version is a complete round; one that failed or was aborted published nothing to start from (an
        # ended round never changes state, so this holds until the flush reads it)
        state = rt.state.round(msg.federation, base).state
        if state != RoundStatus.COMPLETE:
            raise StaleDelta(
                f"version {base} was never published (round {base} is {state}); the current version of "
                f"{msg.federation!r} is {latest}"
            )
    if rt.state.round(msg.federation, r).state == RoundStatus.OPEN:
        return r
    return rt.state.current_round(msg.federation)


def staleness_problem(msg: IngestMessage, latest: int, config: FederationConfig) -> str | None:
    """Why the base version is refused (not yet published, or more than max_staleness versions behind
    ``latest``); None when it is fine."""
    base = msg.base_version
    if base is None:
        return None
    if base > latest:
        return f"base version {base} is not published yet: the current version of {msg.federation!r} is {latest}"
    if latest - base > config.max_staleness:
        return (
            f"delta trained from version {base} is {latest - base} versions stale: the current version of "
            f"{msg.federation!r} is {latest} and --max-staleness is {config.max_staleness}; pull version {latest} "
            "and train again"
        )
    return None


def check_buffered_reply(msg: IngestMessage, reply: Reply, config: FederationConfig) -> None:
    """The Lua script's own staleness verdicts (latest_complete moves while a delta is judged)."""
    if not config.buffered:
        return
    if reply.status in (ScriptStatus.STALE, ScriptStatus.FUTURE_BASE):
        latest = int(reply.detail)
        problem = staleness_problem(msg, latest, config)
        raise StaleDelta(problem or f"base version {msg.base_version} does not fit the current version {latest}")
    if reply.status == ScriptStatus.NO_BASE:
        config.check_upload(None, msg.base_version)


def _check_norms(index: DeltaIndex, config: FederationConfig) -> None:
    for module, entry in index.modules.items():
        if entry.norm > config.max_update_norm:
            raise UpdateTooLarge(
                f"module {module!r}: update norm ||s·B·A|| = {entry.norm:.4g} is above the "
                f"federation's bound {config.max_update_norm:g} (--max-update-norm)"
            )


def _check_lr_sum(msg: IngestMessage) -> None:
    """A SCAFFOLD federation's uploads declare the learning rate summed over their local steps, in range."""
    from ..aggregation.variates import MIN_LR_SUM

    if msg.lr_sum is None:
        raise InvalidAdapter(
            "this federation uses SCAFFOLD: the upload must declare lr_sum, the learning rate summed over "
            "the local steps that trained it (`chorus-mq train` does; the SDK's upload(lr_sum=...))"
        )
    if not (math.isfinite(msg.lr_sum) and msg.lr_sum >= MIN_LR_SUM):
        raise InvalidAdapter(f"lr_sum must be a finite number of at least {MIN_LR_SUM:g}, got {msg.lr_sum!r}")


def _check_scaffold_ranks(rt: Runtime, federation: str, index: DeltaIndex) -> None:
    """SCAFFOLD's variates live on the global adapter's tensors: every module at the global rank and scaling."""
    from ..adapters import LoraSpec
    from ..results import fetch_manifest

    start = rt.state.latest_complete(federation)
    if start is None:
        raise InvalidAdapter("this SCAFFOLD federation has no global adapter to start from (no round 0)")
    manifest, _sha = fetch_manifest(rt.state, rt.store, federation, start)
    spec = LoraSpec.from_peft_config(manifest.adapter_config)
    for module, entry in sorted(index.modules.items()):
        rank, scaling = spec.rank_for(module), spec.scaling(module)
        if entry.rank != rank or not math.isclose(entry.scaling, scaling, rel_tol=1e-9):
            raise IncompatibleDelta(
                f"module {module!r} has rank {entry.rank} and scaling {entry.scaling:g}; this SCAFFOLD federation's "
                f"global adapter (round {start}) has rank {rank} and scaling {scaling:g}: its variates live on "
                "those tensors, so every client trains at the global adapter's own rank and alpha"
            )


def _record(
    msg: IngestMessage, size: int, key: str, ikey: str, index_bytes: bytes, index: DeltaIndex, declared: tuple[str, ...]
) -> DeltaRecord:
    import hashlib

    ranks = [index.modules[m].rank for m in declared if m in index.modules]
    uniform = len(set(ranks)) == 1
    return DeltaRecord(
        client_id=msg.client_id,
        sha256=msg.sha256,
        size=size,
        dataset_size=msg.dataset_size,
        upload_id=msg.upload_id,
        ts=msg.ts,
        key=key,
        index_key=ikey,
        index_sha256=hashlib.sha256(index_bytes).hexdigest(),
        modules=len(ranks),
        present=present_bitmap(declared, index.modules),
        rank=ranks[0] if uniform else None,
        ranks=None if uniform else tuple(ranks),
        bytes=tensor_bytes(index),
        max_norm=max((e.norm for e in index.modules.values()), default=0.0),
        dp=None if msg.dp is None else msg.dp.model_dump(),
        lr_sum=msg.lr_sum,
        label_counts=None if msg.label_counts is None else dict(msg.label_counts),
        global_eval=None if msg.global_eval is None else msg.global_eval.model_dump(),
        base_version=msg.base_version,
    )


def _precheck_round(rt: Runtime, msg: IngestMessage, r: int) -> None:
    """Refuse a closed round before downloading anything (the Lua script re-checks atomically)."""
    info = rt.state.round(msg.federation, r)
    if info.state != RoundStatus.OPEN and msg.sha256 not in info.shas_of(msg.client_id):
        raise RoundClosed(_closed_reason(r, info.state))
    if info.selected and msg.client_id not in info.selected:
        raise NotSelected(_not_selected_reason(rt, msg, r))


def _closed_reason(r: int, state: str) -> str:
    if state == RoundStatus.AGGREGATING:
        return (
            f"round {r} is closed: its quorum was reached and it is aggregating; "
            f"upload to round {r + 1} once round_complete is announced"
        )
    return f"round {r} is closed (state {state}); upload to the current round"


def _not_selected_reason(rt: Runtime, msg: IngestMessage, r: int) -> str:
    # never say when it is drawn next: the draw is secret until its round opens (round_opened names it)
    return (
        f"client {msg.client_id!r} was not selected for round {r} (client sampling: the workers draw "
        "the federation's clients_per_round clients each round, in secret until the round opens); "
        "watch for a round_opened event that lists it"
    )


def _reject(rt: Runtime, inbox: Inbox, entry_id: str, msg: IngestMessage, r: int, exc: ChorusError) -> Verdict:
    """An authenticated client's delta was refused: tell it why in its federation's stream (the first time per
    round and reason; repeats are counted), and retire its entry in the same transition."""
    reason = str(exc)
    code = getattr(exc, "code", "rejected")
    event = {"client": msg.client_id, "upload_id": msg.upload_id, "sha256": msg.sha256, "reason": reason, "code": code}
    event["round"] = msg.round or 0
    reply = inbox.reject(rt.state.scripts, entry_id, r, msg.client_id, code, event, maxlen=rt.settings.events_maxlen)
    if reply.status == ScriptStatus.JUDGED:
        log.info("inbox entry %s of %s was judged before; nothing to add", entry_id, inbox.key)
    elif reply.status == ScriptStatus.COUNTED:
        if _is_power_of_ten(reply.n):  # the log grows with the logarithm of the repeats
            log.warning(
                "rejected delta %s/%s x%d (repeats are counted, not published): %s",
                msg.federation,
                msg.client_id,
                reply.n,
                reason,
            )
    else:
        log.warning("rejected delta %s/%s: %s", msg.federation, msg.client_id, reason)
    METRICS.deltas.labels(outcome="rejected", code=code).inc()
    _discard_upload(rt, msg)
    return Verdict(False, msg.federation, msg.round, msg.client_id, msg.upload_id, code, reason)


def _discard_upload(rt: Runtime, msg: IngestMessage) -> None:
    """Delete the client's uploaded object once its verdict is recorded, so its own prefix holds only
    uploads in flight. Only for authenticated records (a forged one must not delete another's upload);
    an accepted delta lives on as the worker's own copy under ``accepted/``. Best effort: the bucket's
    lifecycle rule on ``<F>/deltas/`` is the backstop (README, deploy/minio/)."""
    key = delta_key(msg.federation, msg.client_id, msg.sha256)
    try:
        rt.store.delete(key)
    except ChorusError as exc:
        log.warning("could not delete %s after its verdict (the lifecycle rule will): %s", key, exc)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _drop(rt: Runtime, inbox: Inbox, entry_id: str, msg: IngestMessage | None, exc: ChorusError) -> Verdict:
    """A record whose sender cannot be established: logged and counted, never published; its entry retired."""
    code = getattr(exc, "code", "unauthenticated")
    log.warning("dropped inbox record %s of %s: %s", entry_id, inbox.federation, exc)
    METRICS.deltas.labels(outcome="dropped", code=code).inc()
    if isinstance(exc, UnknownFederation):
        inbox.ack_delete([entry_id])
    else:
        inbox.drop(rt.state.scripts, entry_id, code, maxlen=rt.settings.events_maxlen)
    client = msg.client_id if msg else ""
    upload = msg.upload_id if msg else ""
    return Verdict(False, inbox.federation, msg.round if msg else None, client, upload, code, str(exc))
