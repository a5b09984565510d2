"""Ingest one uploaded delta: fetch, re-hash, validate, register (atomically) and maybe fire the quorum."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..adapters import DeltaFile
from ..errors import (
    ChorusError, ConfigError, DuplicateDelta, IncompatibleDelta, InvalidAdapter, ObjectMissing, RoundClosed,
    UnknownFederation, UnknownRound,
)
from ..ids import check_name
from ..layout import delta_key
from ..messages import IngestMessage
from ..state import EventLog, FederationKeys
from . import auth
from .runtime import Runtime

log = logging.getLogger(__name__)

#: Errors that mean the delta (or its message) is bad: reject it, never retry.
REJECTABLE = (ConfigError, InvalidAdapter, UnknownFederation, UnknownRound, RoundClosed, DuplicateDelta, ObjectMissing,
              auth.AuthError)


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

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def ingest(rt: Runtime, raw: dict, enqueue_aggregate: Callable[[str, int, int], None]) -> Verdict:
    """Run the whole ingest of one message; transient failures raise so Celery retries."""
    msg = _parse(raw)
    try:
        return _ingest(rt, msg, enqueue_aggregate)
    except REJECTABLE as exc:
        return _reject(rt, msg, exc)


def _parse(raw: dict) -> IngestMessage:
    try:
        return IngestMessage.parse(raw if isinstance(raw, dict) else {})
    except InvalidAdapter:
        log.warning("dropping malformed ingest message: %.200r", raw)
        raise


def _ingest(rt: Runtime, msg: IngestMessage, enqueue_aggregate) -> Verdict:
    config = rt.state.config(msg.federation)
    check_name(msg.client_id, "client id")
    expected = delta_key(msg.federation, msg.client_id, msg.sha256)
    if msg.object_key != expected:
        raise auth.AuthError(f"object key {msg.object_key!r} is not this client's; expected {expected!r}")
    r = auth.verify(rt, msg, msg.round or rt.state.current_round(msg.federation))
    _precheck_round(rt, msg, r)

    spool = rt.spool / f"{msg.upload_id}.safetensors"
    try:
        # the store checks the size against the limit before fetching anything, then re-hashes
        rt.store.download(expected, spool, expected_sha256=msg.sha256, max_bytes=rt.settings.max_delta_bytes)
        size = spool.stat().st_size
        if size != msg.size:
            raise InvalidAdapter(f"object is {size} bytes but the message says {msg.size}")
        shapes, summary = _validate(rt, spool)
    finally:
        spool.unlink(missing_ok=True)

    record = {"client_id": msg.client_id, "sha256": msg.sha256, "object_key": expected, "size": size,
              "dataset_size": msg.dataset_size, "upload_id": msg.upload_id, "ts": msg.ts, **summary}
    reg = rt.state.register(msg.federation, r, client=msg.client_id, sha256=msg.sha256, record=record,
                            upload_id=msg.upload_id, shapes=shapes)
    if reg.status == "conflict":
        raise DuplicateDelta(
            f"client {msg.client_id!r} already has a different delta (sha256 {reg.detail[:12]}…) in round {r}"
        )
    if reg.status == "closed":
        raise RoundClosed(_closed_reason(r, reg.detail))
    if reg.status == "no_round":
        raise UnknownRound(f"federation {msg.federation!r} has no round {r}")
    if reg.status == "shape_mismatch":
        raise IncompatibleDelta(f"shape mismatch: {reg.detail}")
    if reg.status == "fired":
        enqueue_aggregate(msg.federation, r, reg.epoch)
    log.info("delta %s/%s round %s: %s (%d/%s)", msg.federation, msg.client_id, r, reg.status, reg.n, config.quorum)
    return Verdict(True, msg.federation, r, msg.client_id, msg.upload_id, reg.status, epoch=reg.epoch)


def _precheck_round(rt: Runtime, msg: IngestMessage, r: int) -> None:
    """Refuse a closed round before downloading anything (the Lua script re-checks atomically)."""
    info = rt.state.round(msg.federation, r)
    if info["state"] != "open" and rt.state.registered_sha(msg.federation, r, msg.client_id) != msg.sha256:
        raise RoundClosed(_closed_reason(r, info["state"]))


def _closed_reason(r: int, state: str) -> str:
    if state == "aggregating":
        return (f"round {r} is closed: its quorum was reached and it is aggregating; "
                f"upload to round {r + 1} once round_complete is announced")
    return f"round {r} is closed (state {state}); upload to the current round"


def _validate(rt: Runtime, path) -> tuple[dict[str, tuple[int, int]], dict]:
    """Parse and fully check the delta; return module shapes and a small summary for the record."""
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, int] = {}
    with DeltaFile.open(path, max_header_bytes=rt.settings.max_header_bytes) as delta:
        for module in delta.modules:
            A, B = delta.factors(module)
            shapes[module] = (int(B.shape[0]), int(A.shape[1]))
            ranks[module] = int(A.shape[0])
        for key in delta.extras:
            delta.extra(key)
        spec = delta.spec
    if not shapes:
        raise InvalidAdapter("the delta holds no LoRA modules")
    # a pseudo-module pins the layout: mixing Conv1D and Linear layouts would corrupt residuals
    shapes["__fan_in_fan_out__"] = (int(spec.fan_in_fan_out), 0)
    return shapes, {"modules": len(ranks), "max_rank": max(ranks.values()), "min_rank": min(ranks.values())}


def _reject(rt: Runtime, msg: IngestMessage, exc: ChorusError) -> Verdict:
    reason = str(exc)
    code = getattr(exc, "code", "rejected")
    log.warning("rejected delta %s/%s: %s", msg.federation, msg.client_id, reason)
    # an unknown or invalid federation has no stream to tell, and none is made up for it
    if not isinstance(exc, UnknownFederation) and rt.redis.exists(FederationKeys(msg.federation).meta):
        EventLog(rt.redis, msg.federation, rt.settings.events_maxlen, rt.state.scripts).emit(
            "delta_rejected", msg.round or 0, client=msg.client_id, upload_id=msg.upload_id,
            sha256=msg.sha256, reason=reason, code=code,
        )
    return Verdict(False, msg.federation, msg.round, msg.client_id, msg.upload_id, code, reason)
