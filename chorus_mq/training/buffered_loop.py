"""``chorus-mq train`` in a buffered federation: no round barrier, one contribution after another.

Each contribution: pull the latest version ``v``, train from it, wait while the open buffer holds
``--max-per-client-per-flush`` of this client's deltas, upload naming ``--base-version v``, then start
again at once. ``--rounds`` counts the client's own contributions. The work dir records each contribution
(``buffered_state.json``: its slot, sha256, the buffer that took it, its base version) as soon as the verdict
is in, and the trained adapter before it is uploaded, so a restart re-uploads the same bytes (a duplicate the
server counts once: the ledger of ``register_delta.lua``) instead of training and counting again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, DuplicateDelta, NotSelected, Rejected, StaleDelta, Timeout
from ..names import ENDED_STATES, RoundStatus
from ..state import FederationConfig
from .records import RoundRecord, Trained

if TYPE_CHECKING:
    from ..sdk.participant import ParticipantSdk
    from .dp import PrivacyLedger
    from .local_round import TrainConfig

log = logging.getLogger(__name__)

_ENDED = frozenset(s.value for s in ENDED_STATES)
_LOST = _ENDED - {RoundStatus.COMPLETE.value}  # a flush that ended without publishing its deltas

BUFFERED_STATE_FILE = "buffered_state.json"
_FORMAT = "chorus-buffered-train/1"


class Session(Protocol):
    """What a contribution needs of the ``train`` run (``driver.py``'s session): train a round, find its dir."""

    work: Path
    config: TrainConfig
    ledger: PrivacyLedger | None

    def round_dir(self, r: int) -> Path: ...

    def train(self, r: int, start: int | None) -> Trained: ...


@dataclass
class Contribution:
    """One accepted delta of this client: the buffer (round) that took it and how that flush ended."""

    slot: int
    sha256: str
    round: int
    base_version: int
    upload: str
    state: str = RoundStatus.OPEN.value  # the buffer's state when last looked at; complete / failed / ...
    recorded: bool = False  # a RoundRecord was yielded for it


@dataclass
class BufferedState:
    """``buffered_state.json``: every contribution this work dir made, in order."""

    path: Path
    contributions: list[Contribution] = field(default_factory=list)

    @classmethod
    def open(cls, work: Path) -> BufferedState:
        path = work / BUFFERED_STATE_FILE
        if not path.exists():
            return cls(path)
        raw = json.loads(path.read_text())
        if raw.get("format") != _FORMAT:
            raise ConfigError(f"{path} is not a chorus-mq buffered train state ({_FORMAT})")
        return cls(path, [Contribution(**c) for c in raw["contributions"]])

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, "contributions": [asdict(c) for c in self.contributions]}))
        tmp.replace(self.path)

    def counted(self) -> int:
        """Contributions that count: accepted, and not in a flush that failed."""
        return sum(1 for c in self.contributions if c.state not in _LOST)

    def next_slot(self) -> int:
        return max((c.slot for c in self.contributions), default=0) + 1

    def by_sha(self, sha: str) -> Contribution | None:
        return next((c for c in self.contributions if c.sha256 == sha), None)


def run_buffered(
    sdk: ParticipantSdk,
    federation: str,
    client_id: str,
    session: Session,
    rounds: int,
    *,
    timeout: float | None,
    poll: float,
    verdict_wait: float,
) -> Iterator[RoundRecord]:
    """Make ``rounds`` contributions to buffered ``federation`` (continuing a work dir's count); yield a record
    per contribution once its flush has ended."""
    if session.ledger is not None:
        raise ConfigError("client-side DP (--dp-epsilon) is not built for buffered federations yet")
    config = FederationConfig.from_hash(sdk.state.meta(federation))
    state = BufferedState.open(session.work)
    _refresh(sdk, federation, client_id, state)
    yield from _records(state, RoundRecord)
    while state.counted() < rounds:
        started = time.monotonic()
        _wait_until_drawn(sdk, federation, client_id, timeout=timeout, poll=poll)
        slot = state.next_slot()
        latest = sdk.state.latest_complete(federation)
        trained = Trained.load(session.round_dir(slot))
        version = latest or 0
        if trained is None or version - (trained.start_round or 0) > config.max_staleness:
            log.info("contribution %d: training from version %d", slot, version)
            trained = session.train(slot, latest)
        else:
            log.info("contribution %d: re-uploading the adapter trained from version %s", slot, trained.start_round)
        _wait_for_own_buffers(sdk, federation, state, config.max_per_client_per_flush, timeout=timeout, poll=poll)
        try:
            result = sdk.upload(
                federation,
                trained.adapter,
                client_id,
                dataset_size=float(trained.examples),
                base_version=trained.start_round or 0,
                progress=session.config.progress,
                timeout=verdict_wait,
            )
        except Rejected as exc:
            if exc.code == StaleDelta.code:  # versions moved on while it trained: train again from the latest
                log.info("contribution %d: %s; training again", slot, exc.reason)
                shutil.rmtree(session.round_dir(slot), ignore_errors=True)
                continue
            if exc.code == DuplicateDelta.code:  # its previous delta is still in the open buffer
                continue
            if exc.code == NotSelected.code:  # a buffer that did not draw it opened while it trained
                log.info("contribution %d: %s; waiting for a buffer that draws it", slot, exc.reason)
                continue
            raise
        r = _locate(sdk, federation, client_id, result.sha256, trained.start_round or 0)
        if state.by_sha(result.sha256) is None:
            state.contributions.append(
                Contribution(slot, result.sha256, r, trained.start_round or 0, result.status, RoundStatus.OPEN.value)
            )
            state.save()
        log.info("contribution %d: %s into buffer %d (%.1fs)", slot, result.status, r, time.monotonic() - started)
        _refresh(sdk, federation, client_id, state)
        yield from _records(state, RoundRecord, trained)
    for c in state.contributions:  # the last flushes: wait for them, so every record has its outcome
        if c.state not in _ENDED:
            sdk.wait_round(federation, c.round, timeout=timeout)
    _refresh(sdk, federation, client_id, state)
    yield from _records(state, RoundRecord)


def _records(state: BufferedState, record: Any, trained: Trained | None = None) -> Iterator[RoundRecord]:
    """A record per contribution whose flush has ended and was not reported yet."""
    for c in state.contributions:
        if c.recorded or c.state not in _ENDED:
            continue
        c.recorded = True
        state.save()
        loss = trained.loss if trained is not None else float("nan")
        yield record(c.round, c.state, c.upload, c.base_version, loss, None, None, 0, 0.0, 0, 0)


def _refresh(sdk: ParticipantSdk, federation: str, client_id: str, state: BufferedState) -> None:
    """Each contribution's buffer state (a flush that failed no longer counts)."""
    changed = False
    for c in state.contributions:
        if c.state in _ENDED:
            continue
        info = sdk.state.round(federation, c.round)
        if info.state != c.state:
            c.state = RoundStatus(info.state).value
            changed = True
    if changed:
        state.save()


def _wait_for_own_buffers(
    sdk: ParticipantSdk, federation: str, state: BufferedState, allowance: int, *, timeout: float | None, poll: float
) -> None:
    """Until no open buffer holds ``allowance`` (``--max-per-client-per-flush``) of this client's deltas."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def full() -> int | None:
        held: dict[int, int] = {}
        for c in state.contributions:
            held[c.round] = held.get(c.round, 0) + 1
        return next(
            (
                r
                for r, k in sorted(held.items())
                if k >= allowance and sdk.state.round(federation, r).state == RoundStatus.OPEN
            ),
            None,
        )

    while (r := full()) is not None:
        if deadline is not None and time.monotonic() > deadline:
            raise Timeout(f"buffer {r} of {federation!r} did not flush within {timeout:.0f}s")
        time.sleep(poll)


def _wait_until_drawn(
    sdk: ParticipantSdk, federation: str, client_id: str, *, timeout: float | None, poll: float
) -> None:
    """Until the open buffer may take this client's delta: with ``--clients-per-round`` each buffer draws its
    clients when it opens (``round_opened`` lists them), and a client not drawn waits for a later buffer."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        r = sdk.state.current_round(federation)
        info = sdk.state.round(federation, r)
        if info.state != RoundStatus.OPEN or not info.selected or client_id in info.selected:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise Timeout(f"no buffer of {federation!r} drew client {client_id!r} within {timeout:.0f}s")
        time.sleep(poll)


def _locate(sdk: ParticipantSdk, federation: str, client_id: str, sha: str, base: int) -> int:
    """The buffer (round) that holds this client's delta ``sha``: a re-upload after a restart is a duplicate
    of the buffer that took it first, wherever the verdict was given."""
    for r in range(sdk.state.current_round(federation), base, -1):
        if sha in sdk.state.registered_shas(federation, r, client_id):
            return r
    raise ConfigError(f"delta {sha[:12]}... was accepted but no buffer after version {base} holds it")
