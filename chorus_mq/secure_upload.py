"""The client's side of a secure round, driven through Redis and the store: advertise keys, share keys,
masked input, unmask; then wait for the round to publish.

What a client reads: the round's public secure-aggregation hash (phase, survivors, the parameters
published at the open) and its own delivery hash ``secagg:{r}:to:{C}`` (its neighbours' public
keys, the shares sealed to it). What it writes: one signed record per phase to its own inbox,
and its masked input (uint64 safetensors) under its own store prefix. Its keys and seeds stay in
its :class:`SecAggClient`, which is written to ``state_dir`` (mode 0600) with each phase's payload
before that payload is sent, so a client restarted mid-round picks up where it was and sends a
phase's payload again rather than a new one; a new round starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ObjectExists, SecAggError, Timeout
from .layout import masked_input_key
from .names import RoundStatus, SecAggPhase
from .secagg import wire
from .secagg.client import SecAggClient
from .secagg.messages import UnmaskRequest
from .secagg.params import SecAggParams
from .secagg.public import RoundPublic
from .secagg.stored import masked_bytes
from .state.inbox import Inbox
from .state.secagg import SecAggRounds
from .state.secagg_flow import adverts_of, shares_of

if TYPE_CHECKING:
    from .sdk.connection import Connection

#: a callback told of every phase this client enters (``secagg_phase`` events on the CLI)
OnPhase = Callable[[int, str], None]


@dataclass
class _Saved:
    """What a restarted client needs: its protocol state, the phases it has already sent, and the payload of
    each phase as computed, saved before it is sent."""

    client: SecAggClient
    sent: list[str] = field(default_factory=list)
    #: phase -> its payload. A client that dies after sending a phase's record and before noting it sent sends
    #: that same payload again, never a new one: a new unmask response, to a request a lying worker changed
    #: meanwhile, could reveal the other share of a peer the first one did
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureResult:
    federation: str
    client_id: str
    round: int
    #: the clients the published sum holds (this client among them unless it dropped)
    summed: tuple[str, ...]
    masked_key: str


class SecureUpload:
    """One client's secure round ``r`` of ``federation``, through ``sdk``'s Redis and store."""

    def __init__(
        self,
        sdk: Connection,
        federation: str,
        client_id: str,
        r: int,
        *,
        secret: str,
        state_dir: Path | None = None,
        on_phase: OnPhase | None = None,
    ):
        self.sdk = sdk
        self.federation = federation
        self.client_id = client_id
        self.r = r
        self.secret = secret
        self.rounds = SecAggRounds(sdk.redis, federation)
        self.state_dir = state_dir
        self.on_phase = on_phase or (lambda r, phase: None)
        self.masked_key = ""

    @property
    def _path(self) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / f"secagg-{self.federation}-{self.r:06d}-{self.client_id}.json"

    def _load(self, params: SecAggParams) -> _Saved | None:
        path = self._path
        if path is None or not path.exists():
            return None
        raw = json.loads(path.read_text())  # this client's own file, written by _save below (JSON: never pickle)
        return _Saved(SecAggClient.restore(params, raw["client"]), list(raw["sent"]), dict(raw.get("pending", {})))

    def _save(self, saved: _Saved) -> None:
        path = self._path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds private keys and seeds
        with os.fdopen(fd, "w") as f:
            json.dump({"client": saved.client.state(), "sent": saved.sent, "pending": saved.pending}, f)
        tmp.replace(path)

    def _forget(self) -> None:
        path = self._path
        if path is not None:
            path.unlink(missing_ok=True)

    def _send(self, phase: SecAggPhase, payload: Mapping[str, Any]) -> None:
        record = wire.PhaseRecord(self.federation, self.r, self.client_id, phase, payload).signed(self.secret)
        Inbox(self.sdk.redis, self.federation, self.client_id).append(record.to_json())
        self.sdk.drain_if_eager(self.federation)

    def wait_public(self, deadline: float, poll: float) -> RoundPublic:
        """The round's published parameters, once its secure aggregation opened."""
        while True:
            raw = self.rounds.public_params(self.r)
            if raw is not None:
                return RoundPublic.from_dict(raw)
            self._check_time(deadline, "the round's secure aggregation to open (workers and beat running?)")
            time.sleep(poll)

    def _check_time(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise Timeout(f"round {self.r} of {self.federation}: gave up waiting for {what}")

    def _wait_phase(self, after: SecAggPhase, deadline: float, poll: float) -> SecAggPhase:
        """Wait until the round has left ``after``; the phase it is in now."""
        while True:
            state = self.rounds.state(self.r)
            if state is not None and state.phase != after:
                if state.phase is SecAggPhase.ABORTED:
                    raise SecAggError(f"round {self.r}'s secure aggregation was aborted: {state.reason}")
                return state.phase
            self._check_time(deadline, f"the {after} phase to close")
            time.sleep(poll)

    def run(self, tensors: Mapping[str, Any], *, timeout: float = 600.0, poll: float = 0.1) -> SecureResult:
        """Take part in every phase with ``tensors`` (the trained factor per module, and the task head if any,
        at the published shapes), then wait for the round to publish."""
        deadline = time.monotonic() + timeout
        pub = self.wait_public(deadline, poll)
        if self.client_id not in pub.cohort:
            raise SecAggError(f"client {self.client_id!r} is not in round {self.r}'s secure-aggregation cohort")
        params = pub.params(self.federation, self.r)
        # checked before any key is advertised: a wrong shape fails here, not after the neighbours paired with us
        x = pub.client_input(self.client_id, pub.layout.flatten(tensors))
        saved = self._load(params) or _Saved(SecAggClient(params, self.client_id))
        client = saved.client
        order = (SecAggPhase.ADVERTISE, SecAggPhase.SHARE, SecAggPhase.MASKED_INPUT, SecAggPhase.UNMASK)
        for phase in order:
            state = self.rounds.state(self.r)
            assert state is not None
            if state.phase is SecAggPhase.ABORTED:
                raise SecAggError(f"round {self.r}'s secure aggregation was aborted: {state.reason}")
            if phase.value not in saved.sent:
                if (
                    phase is SecAggPhase.UNMASK
                    and state.phase is SecAggPhase.DONE
                    and self.client_id in state.survivors
                ):
                    break  # the others' answers already removed every mask (closed 'enough'): summed all the same
                if state.phase != phase:
                    raise SecAggError(
                        f"client {self.client_id!r} missed the {phase} phase of round {self.r} (it is {state.phase}): "
                        "the round goes on without it"
                    )
                self.on_phase(self.r, phase.value)
                payload = saved.pending.get(phase.value)
                if payload is None:
                    payload = self._payload(client, phase, x)
                    saved.pending[phase.value] = payload
                    self._save(saved)  # on disk before anyone can read it: a restart sends it again, unchanged
                elif phase is SecAggPhase.MASKED_INPUT:
                    self.masked_key = str(payload["key"])
                self._send(phase, payload)
                saved.sent.append(phase.value)
                self._save(saved)
            if phase is SecAggPhase.UNMASK:
                break
            if self._wait_phase(phase, deadline, poll) is SecAggPhase.DONE:
                break
        self.on_phase(self.r, SecAggPhase.DONE.value)
        summed = self._wait_published(deadline, poll)
        self._forget()
        return SecureResult(self.federation, self.client_id, self.r, summed, self.masked_key)

    def _payload(self, client: SecAggClient, phase: SecAggPhase, x: Any) -> dict[str, Any]:
        if phase is SecAggPhase.ADVERTISE:
            return wire.advertise_payload(client.advertise())
        delivered = self.rounds.delivered(self.r, self.client_id)
        if phase is SecAggPhase.SHARE:
            return wire.share_payload(client.share_keys(adverts_of(delivered)))
        if phase is SecAggPhase.MASKED_INPUT:
            masked = client.masked_input(shares_of(delivered), x)
            raw = masked_bytes(masked.masked)
            sha = hashlib.sha256(raw).hexdigest()
            self.masked_key = masked_input_key(self.federation, self.client_id, self.r, sha)
            try:
                self.sdk.store.put_bytes(self.masked_key, raw, write_once=True)
            except ObjectExists:
                pass  # content-addressed
            return wire.masked_payload(self.masked_key, sha, masked.masked_with, masked.refused)
        state = self.rounds.state(self.r)
        assert state is not None
        response = client.unmask(UnmaskRequest(frozenset(state.survivors)))
        return wire.unmask_payload(response)

    def _wait_published(self, deadline: float, poll: float) -> tuple[str, ...]:
        while True:
            info = self.sdk.state.round(self.federation, self.r)
            if info.state == RoundStatus.COMPLETE:
                state = self.rounds.state(self.r)
                return state.survivors if state is not None else ()
            if info.state in (RoundStatus.FAILED, RoundStatus.ABORTED):
                raise SecAggError(f"round {self.r} ended {info.state}: {info.reason}")
            state = self.rounds.state(self.r)
            if state is not None and state.phase is SecAggPhase.ABORTED:
                raise SecAggError(f"round {self.r}'s secure aggregation was aborted: {state.reason}")
            self._check_time(deadline, "the secure round to publish")
            time.sleep(poll)
