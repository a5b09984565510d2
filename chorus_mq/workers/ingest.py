"""Ingest one inbox record: authenticate, fetch, re-hash, bound, validate against the declared model,
index, register (atomically) and maybe fire the quorum.

Order matters: everything cheap and everything that needs no bytes comes first (parse, identity,
round, size), then the header checks against the federation's declared model (before any tensor
data is read), then the full read (finite values, per-module digests and update norms).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..adapters import DeltaFile, DeltaIndex, build_index, check_delta
from ..errors import (
    AuthError,
    ChorusError,
    ConfigError,
    DeltaEvicted,
    DuplicateDelta,
    InvalidAdapter,
    NotSelected,
    ObjectExists,
    ObjectMissing,
    RoundClosed,
    Unauthenticated,
    UnknownFederation,
    UnknownRound,
    UpdateTooLarge,
)
from ..ids import check_name
from ..layout import accepted_key, delta_key, index_key
from ..messages import IngestMessage
from ..names import EventType, RoundStatus, Task
from ..state import EventLog, FederationConfig
from ..state.rounds import DeltaRecord
from . import auth
from .declared import declared_model, present_bitmap, tensor_bytes
from .dispatch import Dispatcher
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
    ObjectMissing,
    AuthError,
)


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
    except (ConfigError, UnknownFederation) as exc:  # no such federation: nobody to tell, nothing to count
        log.warning("dropped inbox record %s: %s", entry_id, exc)
        METRICS.deltas.labels(outcome="dropped", code=exc.code).inc()
        return Verdict(False, federation, None, "", "", exc.code, str(exc))
    try:
        msg = _parse(rt, federation, raw)
        if inbox_client is not None and msg.client_id != inbox_client:
            raise Unauthenticated(f"a record in {inbox_client!r}'s inbox claims to be from {msg.client_id!r}")
    except (InvalidAdapter, Unauthenticated) as exc:
        return _drop(rt, federation, entry_id, None, exc)
    try:
        return _ingest(rt, msg, dispatch)
    except Unauthenticated as exc:
        return _drop(rt, federation, entry_id, msg, exc)
    except UnknownFederation as exc:
        return _drop(rt, federation, entry_id, msg, exc)
    except REJECTABLE as exc:
        return _reject(rt, msg, exc)


def _parse(rt: Runtime, federation: str, raw: Any) -> IngestMessage:
    if isinstance(raw, str):
        msg = IngestMessage.from_record({"m": raw}, rt.settings.max_inbox_record_bytes)
    else:
        msg = IngestMessage.parse(raw)
    if msg.federation != federation:
        raise Unauthenticated(f"a record in {federation!r}'s inbox names federation {msg.federation!r}")
    return msg


def _ingest(rt: Runtime, msg: IngestMessage, dispatch: Dispatcher) -> Verdict:
    started = time.perf_counter()
    config = rt.state.config(msg.federation)
    try:
        check_name(msg.client_id, "client id")
    except ConfigError as exc:
        raise Unauthenticated(str(exc)) from None
    r = auth.verify(rt, msg, msg.round or rt.state.current_round(msg.federation))
    if msg.dataset_size is not None and msg.dataset_size > rt.settings.max_dataset_size:
        raise InvalidAdapter(
            f"dataset size {msg.dataset_size:g} is over the limit of "
            f"{rt.settings.max_dataset_size:g} (CHORUS_MAX_DATASET_SIZE)"
        )
    _precheck_round(rt, msg, r)

    source = _source_key(rt, msg, r)
    decl = declared_model(rt, msg.federation, config)
    # file:// hashes the object in place; s3:// downloads it to the spool. The size limit is checked first.
    with rt.store.local_copy(
        source, expected_sha256=msg.sha256, max_bytes=rt.settings.max_delta_bytes, spool_dir=rt.spool
    ) as local:
        etag = local.etag
        size = local.path.stat().st_size
        if size != msg.size:
            raise InvalidAdapter(f"object is {size} bytes but the message says {msg.size}")
        with DeltaFile.open(
            local.path, max_header_bytes=rt.settings.max_header_bytes, max_tensors=decl.decl.max_tensors
        ) as delta:
            check_delta(
                delta, decl.decl, max_pattern_entries=rt.settings.max_pattern_entries, max_rank=rt.settings.max_rank
            )  # header only: before any tensor data is read
            index = build_index(delta)  # reads every tensor once: finite, digests, norms
    _check_norms(index, config)
    METRICS.bytes_in.labels(task="ingest").inc(size)

    # the worker's own copy, out of the client's writable prefix, and the index shards will read by
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
    record = _record(msg, size, key, ikey, index_bytes, index, decl.modules)
    reply = rt.state.register(msg.federation, r, record)
    if reply.status == "conflict":
        raise DuplicateDelta(
            f"client {msg.client_id!r} already has a different delta (sha256 {reply.detail[:12]}...) in round {r}"
        )
    if reply.status == "closed":
        raise RoundClosed(_closed_reason(r, reply.detail))
    if reply.status == "evicted":
        raise DeltaEvicted(
            f"the operator evicted this delta (sha256 {msg.sha256[:12]}...) from round {r}; it cannot "
            "come back into this round: upload another delta, or to the next round"
        )
    if reply.status == "no_round":
        raise UnknownRound(f"federation {msg.federation!r} has no round {r}")
    if reply.status == "not_selected":
        raise NotSelected(_not_selected_reason(rt, msg, r))
    if reply.status == "fired":
        dispatch.send(Task.ROUND, msg.federation, r, reply.epoch)
    _discard_upload(rt, msg)
    METRICS.deltas.labels(outcome=reply.status, code="ok").inc()
    METRICS.phase_seconds.labels(phase="ingest").observe(time.perf_counter() - started)
    log.info("delta %s/%s round %s: %s (%d/%s)", msg.federation, msg.client_id, r, reply.status, reply.n, config.quorum)
    return Verdict(True, msg.federation, r, msg.client_id, msg.upload_id, reply.status, epoch=reply.epoch)


def _check_norms(index: DeltaIndex, config: FederationConfig) -> None:
    for module, entry in index.modules.items():
        if entry.norm > config.max_update_norm:
            raise UpdateTooLarge(
                f"module {module!r}: update norm ||s·B·A|| = {entry.norm:.4g} is above the "
                f"federation's bound {config.max_update_norm:g} (--max-update-norm)"
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
    )


def _precheck_round(rt: Runtime, msg: IngestMessage, r: int) -> None:
    """Refuse a closed round before downloading anything (the Lua script re-checks atomically)."""
    info = rt.state.round(msg.federation, r)
    if info.state != RoundStatus.OPEN and rt.state.registered_sha(msg.federation, r, msg.client_id) != msg.sha256:
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


def _reject(rt: Runtime, msg: IngestMessage, exc: ChorusError) -> Verdict:
    """An authenticated client's delta was refused: tell it why, in its federation's stream."""
    reason = str(exc)
    code = getattr(exc, "code", "rejected")
    log.warning("rejected delta %s/%s: %s", msg.federation, msg.client_id, reason)
    METRICS.deltas.labels(outcome="rejected", code=code).inc()
    EventLog(rt.redis, msg.federation, rt.settings.events_maxlen, rt.state.scripts).emit(
        EventType.DELTA_REJECTED,
        msg.round or 0,
        client=msg.client_id,
        upload_id=msg.upload_id,
        sha256=msg.sha256,
        reason=reason,
        code=code,
    )
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


def _source_key(rt: Runtime, msg: IngestMessage, r: int) -> str:
    """Where to read the delta: the client's upload, or, for a record already registered in round ``r``
    (a redelivery: its upload went with the first verdict), the worker's own verified copy."""
    if rt.state.registered_sha(msg.federation, r, msg.client_id) == msg.sha256:
        return accepted_key(msg.federation, msg.client_id, msg.sha256)
    return delta_key(msg.federation, msg.client_id, msg.sha256)


def _drop(rt: Runtime, federation: str, entry_id: str, msg: IngestMessage | None, exc: ChorusError) -> Verdict:
    """A record whose sender cannot be established: logged and counted, never published."""
    code = getattr(exc, "code", "unauthenticated")
    log.warning("dropped inbox record %s of %s: %s", entry_id, federation, exc)
    METRICS.deltas.labels(outcome="dropped", code=code).inc()
    if not isinstance(exc, UnknownFederation):
        rt.state.count_rejected(federation, code)
    client = msg.client_id if msg else ""
    upload = msg.upload_id if msg else ""
    return Verdict(False, federation, msg.round if msg else None, client, upload, code, str(exc))
