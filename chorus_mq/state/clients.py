"""Registered clients of a federation: secrets, the operator's weights, revocation, replay protection."""

from __future__ import annotations

import builtins
import json
import math
import secrets
import time
from typing import Any, Final

import redis as redis_lib
from redis import Redis

from ..errors import AuthError, ConfigError, Conflict, NotFound, StateCorrupt, UnknownFederation
from ..ids import check_name
from .protocol import opt_text, text_map
from .records import ClientInfo
from .redis_keys import FederationKeys


class _Unchanged:
    """Marks an argument of :meth:`ClientRegistry.set` the caller did not give."""


UNCHANGED: Final = _Unchanged()


def _check_positive(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number above 0, got {value!r}")
    return float(value)


class ClientRegistry:
    """The ``clients`` hash of one federation (operator-written; workers read it)."""

    def __init__(self, redis: Redis, federation: str):
        self.redis = redis
        self.keys = FederationKeys(federation)

    @property
    def federation(self) -> str:
        return self.keys.federation

    def add(self, client: str, *, weight: float | None = None, dataset_size: float | None = None) -> str:
        """Register ``client`` and return its secret (shown once; the operator hands it over)."""
        check_name(client, "client id")
        record = {
            "secret": secrets.token_urlsafe(32),
            "created_at": time.time(),
            "revoked": False,
            "revoked_at": None,
            "weight": _check_positive(weight, "weight"),
            "dataset_size": _check_positive(dataset_size, "dataset size"),
        }
        if not self.redis.exists(self.keys.meta):
            raise UnknownFederation(
                f"no federation named {self.federation!r}; create it with `chorus-mq federation create`"
            )
        if not self.redis.hsetnx(self.keys.clients, client, json.dumps(record)):
            raise Conflict(f"client {client!r} already exists; revoke it and add a new name to rotate")
        from .inbox import Inbox

        Inbox(self.redis, self.federation, client).ensure_group()  # its own stream, read by the workers' group
        return str(record["secret"])

    def set(
        self,
        client: str,
        *,
        weight: float | _Unchanged | None = UNCHANGED,
        dataset_size: float | _Unchanged | None = UNCHANGED,
    ) -> ClientInfo:
        """Change the operator's registered weight or dataset size (None clears it); returns the new record."""
        changes: dict[str, Any] = {}
        if not isinstance(weight, _Unchanged):
            changes["weight"] = _check_positive(weight, "weight")
        if not isinstance(dataset_size, _Unchanged):
            changes["dataset_size"] = _check_positive(dataset_size, "dataset size")
        return self._update(client, changes)

    def revoke(self, client: str) -> ClientInfo:
        """Mark ``client`` revoked: its signatures are refused and it is never drawn again (see ``Acl.revoke``)."""
        return self._update(client, {"revoked": True, "revoked_at": time.time()})

    def list(self) -> builtins.list[ClientInfo]:
        """Every client of the federation, revoked ones included, sorted by name."""
        raw = text_map(self.redis.hgetall(self.keys.clients))
        return [_info(name, self._parse(name, rec)) for name, rec in sorted(raw.items())]

    def active(self) -> builtins.list[str]:
        """The names of the clients not revoked, sorted."""
        return [info.client_id for info in self.list() if info.active]

    def record(self, client: str) -> ClientInfo:
        """One client's record; :class:`NotFound` when it was never registered."""
        return _info(client, self._raw(client))

    def secret(self, client: str) -> str | None:
        """The active secret, None when the client was never registered; raises if revoked."""
        raw = opt_text(self.redis.hget(self.keys.clients, check_name(client, "client id")))
        if raw is None:
            return None
        rec = self._parse(client, raw)
        if rec.get("revoked"):
            raise AuthError(f"client {client!r} has been revoked")
        return str(rec["secret"])

    def claim_nonce(self, client: str, nonce: str, value: str, ttl_s: int) -> str:
        """Bind ``nonce`` to ``value`` for ``ttl_s``; returns the value it was first bound to."""
        prev = opt_text(self.redis.set(self.keys.nonce(client, nonce), value, nx=True, ex=max(ttl_s, 1), get=True))
        return value if prev is None else prev

    # -- internals -------------------------------------------------------------------------

    def _raw(self, client: str) -> dict[str, Any]:
        raw = opt_text(self.redis.hget(self.keys.clients, check_name(client, "client id")))
        if raw is None:
            raise NotFound(f"no client {client!r} in federation {self.federation!r}")
        return self._parse(client, raw)

    def _parse(self, client: str, raw: str) -> dict[str, Any]:
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or "secret" not in rec:
            raise StateCorrupt(f"the record of client {client!r} in {self.keys.clients} is not a client record")
        return rec

    def _update(self, client: str, changes: dict[str, Any]) -> ClientInfo:
        """Read-modify-write one record under WATCH, so concurrent operator commands never lose a change."""
        check_name(client, "client id")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.keys.clients)  # type: ignore[no-untyped-call]
                    raw = opt_text(pipe.hget(self.keys.clients, client))
                    if raw is None:
                        raise NotFound(f"no client {client!r} in federation {self.federation!r}")
                    rec = self._parse(client, raw)
                    if rec.get("revoked") and "revoked" in changes:
                        changes = {}  # revoking twice keeps the first time
                    rec.update(changes)
                    pipe.multi()
                    pipe.hset(self.keys.clients, client, json.dumps(rec))
                    pipe.execute()
                    return _info(client, rec)
                except redis_lib.WatchError:
                    continue


def _info(client: str, rec: dict[str, Any]) -> ClientInfo:
    return ClientInfo(
        client_id=client,
        created_at=float(rec.get("created_at", 0.0)),
        revoked=bool(rec.get("revoked", False)),
        revoked_at=rec.get("revoked_at"),
        weight=rec.get("weight"),
        dataset_size=rec.get("dataset_size"),
    )
