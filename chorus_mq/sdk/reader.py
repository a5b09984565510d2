"""Reading a federation, for both roles: its status, its rounds, its events, the privacy its clients spent."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis as redis_lib

from ..errors import ChorusError, NotFound, Timeout
from ..manifest import Manifest
from ..names import ENDED_STATES, RoundStatus
from ..state import FederationConfig
from ..state.events import Event
from ..state.rounds import DeltaRecord, RoundInfo
from .connection import Connection, service
from .summaries import RoundSummary, Status, per_client, privacy_spent


class Reader(Connection):
    """A federation's settings, rounds, events and privacy ledger, as operators and clients may read them."""

    def status(self, federation: str) -> Status:
        """The federation's settings, its current round and the privacy its clients spent."""
        with service(self.settings):
            meta = self.state.meta(federation)
            cfg = FederationConfig.from_hash(meta)
            current = int(meta["current_round"])
            rnd = self.state.round(federation, current)
            history = self.state.rounds(federation)
            recent = history[-50:]
            # each round's deltas read once: the ledger needs every complete round, client DP the recent ones
            deltas = self._deltas(federation, history if cfg.dp_noise_multiplier else recent)
            client_dp = {}
            for info in recent:
                for client, rec in per_client(deltas[info.round]).items():
                    if rec.dp:
                        client_dp[client] = {**rec.dp, "round": info.round}
            latest = self.state.latest_complete(federation)
            shown, warnings = self._recent_rounds(
                federation, [info for info in recent if info.round in (latest, current)], deltas
            )
            return Status(
                federation=federation,
                base_model=cfg.base_model,
                strategy=str(cfg.strategy),
                quorum=cfg.quorum,
                min_quorum=cfg.effective_min_quorum,
                round_timeout=cfg.round_timeout,
                current_round=current,
                state=RoundStatus(rnd.state),
                deltas=rnd.n,
                deadline=rnd.deadline or None,
                latest_complete=latest,
                task_type=None if cfg.task_type is None else str(cfg.task_type),
                labels=tuple(cfg.labels),
                clients_per_round=cfg.clients_per_round,
                prox_mu=cfg.prox_mu,
                scaffold=cfg.scaffold,
                personal_heads=cfg.personal_heads,
                server_opt=cfg.server_opt_settings(),
                mode=str(cfg.mode),
                buffered=cfg.buffered_settings(),
                selected=rnd.selected,
                privacy=(
                    privacy_spent(
                        cfg, history, self._participants(federation, cfg, history) if cfg.secure_aggregation else deltas
                    )
                    if cfg.dp_noise_multiplier
                    else {}
                ),
                client_dp=client_dp,
                rejected=self._rejected(federation),
                recent_rounds=shown,
                warnings=warnings,
                trainable=rnd.trainable or None,
                secure=self._secure(federation, cfg, current),
            )

    def _secure(self, federation: str, cfg: FederationConfig, r: int) -> dict[str, Any]:
        if not cfg.secure_aggregation:
            return {}
        from ..state.secagg import SecAggRounds

        rounds = SecAggRounds(self.redis, federation)
        out: dict[str, Any] = {
            "neighbours": cfg.secagg_neighbours,
            "threshold": cfg.secagg_threshold,
            "phase_timeout": cfg.secagg_phase_timeout,
        }
        state = rounds.state(r)
        if state is not None:
            out["round"] = {
                "phase": str(state.phase),
                "epoch": state.epoch,
                "deadline": state.deadline,
                "survivors": list(state.survivors),
                **(rounds.public_params(r) or {}),
            }
            out["round"].pop("layout", None)  # one line per tensor: the SDK's RoundPublic has it
        return out

    def _recent_rounds(
        self, federation: str, infos: list[RoundInfo], deltas: dict[int, dict[str, DeltaRecord]]
    ) -> tuple[tuple[RoundSummary, ...], tuple[str, ...]]:
        """The rounds ``status`` details (the latest complete one with its cosines), and what it could not read:
        the manifest lives in the store, and a store that cannot be read leaves the rest of status standing."""
        shown, warnings = [], []
        for info in infos:
            manifest = None
            if info.state == RoundStatus.COMPLETE and deltas[info.round]:
                try:
                    manifest = self._manifest(federation, info.round)
                except ChorusError as exc:
                    warnings.append(f"no cosines for round {info.round}: its manifest could not be read: {exc}")
            shown.append(RoundSummary.of(info, deltas[info.round], manifest))
        return tuple(shown), tuple(warnings)

    def _rejected(self, federation: str) -> dict[str, int]:
        """Inbox records dropped before authentication: the operator's figure; a client's Redis user may not
        read it (another client's junk is none of its business), so a client sees none."""
        try:
            return self.state.rejected(federation)
        except redis_lib.exceptions.NoPermissionError:
            return {}

    def privacy(self, federation: str) -> dict[str, dict[str, float]]:
        """Server-side DP spent by each authenticated client: every complete round it took part in is one
        Gaussian release at the federation's noise multiplier, composed by the accountant. Client sampling
        is public (recorded in each round), so it gives no amplification: only rounds a client was in count."""
        cfg = self.state.config(federation)
        history = self.state.rounds(federation)
        complete = [info for info in history if info.state == RoundStatus.COMPLETE]
        return privacy_spent(cfg, history, self._participants(federation, cfg, complete))

    def _participants(
        self, federation: str, cfg: FederationConfig, rounds: list[RoundInfo]
    ) -> Mapping[int, Iterable[str]]:
        """Who is in each round's release: its deltas' clients, or a secure round's summed clients."""
        if not cfg.secure_aggregation:
            return self._deltas(federation, rounds)
        from ..state.secagg import SecAggRounds

        secure = SecAggRounds(self.redis, federation)
        out: dict[int, tuple[str, ...]] = {}
        for info in rounds:
            state = secure.state(info.round)
            out[info.round] = state.survivors if state is not None else ()
        return out

    def _deltas(self, federation: str, rounds: list[RoundInfo]) -> dict[int, dict[str, DeltaRecord]]:
        return {info.round: self.state.deltas(federation, info.round) for info in rounds}

    def rounds(self, federation: str, *, cosines: int = 0) -> list[RoundSummary]:
        """Every round so far: state, deltas, clients, timings, manifest, what clients reported; the latest
        ``cosines`` complete rounds also with each client's cosine to the aggregate (one manifest read each)."""
        with service(self.settings):
            history = self.state.rounds(federation)
            complete = [info.round for info in history if info.state == RoundStatus.COMPLETE]
            with_cosines = set(complete[-cosines:]) if cosines > 0 else set()
            return [
                RoundSummary.of(
                    info,
                    self.state.deltas(federation, info.round),
                    self._manifest(federation, info.round) if info.round in with_cosines else None,
                )
                for info in history
            ]

    def round(self, federation: str, round_: int, *, cosines: bool = False) -> RoundSummary:
        """One round; ``cosines``: a complete round also with each client's cosine (reads its manifest)."""
        info = self.state.round(federation, round_)
        manifest = self._manifest(federation, round_) if cosines and info.state == RoundStatus.COMPLETE else None
        return RoundSummary.of(info, self.state.deltas(federation, round_), manifest)

    def _manifest(self, federation: str, round_: int) -> Manifest:
        from ..results import fetch_manifest

        return fetch_manifest(self.state, self.store, federation, round_)[0]

    # -- events --------------------------------------------------------------------------------

    def watch(
        self,
        federation: str,
        *,
        from_start: bool = False,
        after: str | None = None,
        until_round: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """Yield events as they happen, from now, from the start, or ``after`` a stream id seen before;
        with ``until_round`` stop after that round ends."""
        with service(self.settings):
            self.state.meta(federation)
            log = self.state.events(federation)
            if after is None:
                replay = from_start or (until_round is not None and self._ended(federation, until_round))
                after = "0-0" if replay else log.last_id()
        deadline = None if timeout is None else time.monotonic() + timeout
        assert after is not None
        for event in log.follow(after, deadline=deadline):
            if event is None:
                continue
            yield event
            if until_round is not None and event.round == until_round and event.terminal:
                return
        if until_round is not None:
            raise Timeout(f"round {until_round} did not finish within {timeout:.0f}s")

    def wait_round(self, federation: str, round_: int, *, timeout: float | None = None) -> RoundSummary:
        """Block until round ``round_`` ended (complete, failed, expired or aborted); return it."""
        if not self._ended(federation, round_):
            for _event in self.watch(federation, until_round=round_, timeout=timeout):
                pass
        return self.round(federation, round_)

    def _ended(self, federation: str, r: int) -> bool:
        try:
            return self.state.round(federation, r).state in ENDED_STATES
        except NotFound:
            return False
