"""The operator's SDK: create federations, add and revoke clients, close, evict from, abort and compact rounds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from ..errors import ConfigError, NotFound, RoundClosed
from ..names import ScriptStatus, Task
from ..state import FederationConfig
from ..state.clients import ClientRegistry
from ..state.rounds import RevokedDelta
from .reader import Reader
from .summaries import ClientCredentials, RoundSummary

if TYPE_CHECKING:
    from ..adapters import ModelDecl


class OperatorSdk(Reader):
    """Operator credentials: manage federations, their clients and their rounds."""

    def create_federation(
        self,
        config: FederationConfig,
        *,
        model: ModelDecl,
        initial_adapter: str | Path | None = None,
        selection_seed: str | None = None,
    ) -> FederationConfig:
        """Create a federation that knows its model (module shapes, task head), optionally with an initial
        adapter published as round 0 (every client's round 1 starts from it). ``selection_seed`` fixes the
        workers' draw of clients per round (secret and random by default: set it only where reproducible
        draws matter more than unpredictable ones, as in a simulation)."""
        from ..federation import create

        return create(
            self.state, self.store, config, model=model, initial_adapter=initial_adapter, selection_seed=selection_seed
        )

    def close_round(self, federation: str, round_: int | None = None) -> RoundSummary:
        """Close a round by hand: aggregate what it has (at least min-quorum deltas)."""
        r = round_ or self.state.current_round(federation)
        t = self.state.close(federation, r, "manual")
        if t.status == ScriptStatus.TOO_FEW:
            raise ConfigError(f"round {r} has {t.n} deltas; at least {t.detail} are needed to close it")
        if t.status == ScriptStatus.NOOP:
            raise RoundClosed(
                f"round {r} is not open (state {t.detail}); the current round is {self.state.current_round(federation)}"
            )
        if t.status == ScriptStatus.FIRED:
            self._dispatch(Task.ROUND, federation, r, t.epoch)
        return self.round(federation, r)

    def evict(self, federation: str, client: str, *, round_: int | None = None, reason: str = "") -> RoundSummary:
        """Remove a client's delta from an open round (operator)."""
        r = round_ or self.state.current_round(federation)
        t = self.state.evict(federation, r, client, reason or "evicted by the operator")
        if t.status != ScriptStatus.EVICTED:
            raise ConfigError(f"cannot evict {client!r} from round {r}: {t.status} {t.detail}".rstrip())
        return self.round(federation, r)

    def abort_round(self, federation: str, *, round_: int | None = None, reason: str = "") -> RoundSummary:
        """Abort an open or aggregating round (operator): nothing of it is aggregated; the next one opens."""
        r = round_ or self.state.current_round(federation)
        t = self.state.abort(federation, r, reason or "aborted by the operator")
        if t.status != ScriptStatus.ABORTED:
            raise ConfigError(f"cannot abort round {r}: {t.status} {t.detail}".rstrip())
        return self.round(federation, r)

    def compact(self, federation: str, round_: int | None = None) -> int:
        """Ask the workers to compact the cumulative correction up to ``round_`` (default: the latest)."""
        r = round_ if round_ is not None else self.state.latest_complete(federation)
        if not r:
            raise NotFound(f"federation {federation!r} has no complete round to compact")
        self._dispatch(Task.COMPACT, federation, r)
        return r

    # -- clients (operators) -----------------------------------------------------------------

    def clients(self, federation: str) -> ClientRegistry:
        self.state.meta(federation)
        return ClientRegistry(self.redis, federation)

    def add_client(
        self, federation: str, client: str, *, weight: float | None = None, dataset_size: float | None = None
    ) -> ClientCredentials:
        """Register a client; create its Redis user (append to its inbox, read its federation); return its
        credentials (shown once)."""
        from ..state.acl import Acl, check_client_database, client_url

        registry = self.clients(federation)
        if self.settings.client_acl != "off":
            check_client_database(self.settings.public_redis_url or self.settings.redis_url)  # before registering
        secret = registry.add(client, weight=weight, dataset_size=dataset_size)
        username = url = None
        if self.settings.client_acl != "off":
            acl = Acl(self.redis)
            try:
                acl.grant(federation, client, secret)
                acl.save()
                username = acl.username(federation, client)
                url = client_url(self.settings.public_redis_url or self.settings.redis_url, federation, client, secret)
            except redis_lib.ResponseError as exc:
                if self.settings.client_acl == "on":
                    registry.revoke(client)
                    raise ConfigError(
                        f"cannot create the Redis user for {client!r}: {exc}; use operator "
                        "credentials (CHORUS_REDIS_URL) that may manage ACL users"
                    ) from None
        return ClientCredentials(federation, client, secret, username, url)

    def revoke_client(self, federation: str, client: str) -> RevokedDelta:
        """Revoke a client: its signatures stop verifying, its Redis user is removed, and its delta leaves the
        open current round (an aggregating round keeps it). Returns what happened to that delta."""
        from ..state.acl import Acl

        self.clients(federation).revoke(client)
        if self.settings.client_acl != "off":
            try:
                acl = Acl(self.redis)
                acl.revoke(federation, client)
                acl.save()
            except redis_lib.ResponseError:
                if self.settings.client_acl == "on":
                    raise
        return self.state.evict_revoked(federation, client)

    def _dispatch(self, task: Task, *args: Any) -> None:
        from ..workers.app import get_dispatcher

        get_dispatcher(self.settings).send(task, *args)
