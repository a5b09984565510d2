"""Registered clients of a federation: HMAC secrets, revocation, and replay protection."""

from __future__ import annotations

import json
import secrets
import time

from redis import Redis

from ..errors import AuthError, Conflict, NotFound
from ..ids import check_name
from .keys import FederationKeys


class ClientRegistry:
    def __init__(self, redis: Redis, federation: str):
        self.redis = redis
        self.keys = FederationKeys(check_name(federation, "federation name"))

    def add(self, client: str) -> str:
        """Register ``client`` and return its secret (shown once; the operator hands it over)."""
        check_name(client, "client id")
        secret = secrets.token_urlsafe(32)
        record = json.dumps({"secret": secret, "created_at": time.time(), "revoked": False})
        if not self.redis.hsetnx(self.keys.clients, client, record):
            raise Conflict(f"client {client!r} already exists; revoke it and add a new name to rotate")
        return secret

    def revoke(self, client: str) -> None:
        record = self._record(client)
        record.update(revoked=True, revoked_at=time.time())
        self.redis.hset(self.keys.clients, client, json.dumps(record))

    def list(self) -> list[dict]:
        out = []
        for name, raw in sorted(self.redis.hgetall(self.keys.clients).items()):
            rec = json.loads(raw)
            out.append({"client_id": name, "created_at": rec["created_at"], "revoked": rec["revoked"]})
        return out

    def secret(self, client: str) -> str | None:
        """The active secret, None when the client was never registered; raises if revoked."""
        raw = self.redis.hget(self.keys.clients, client)
        if raw is None:
            return None
        rec = json.loads(raw)
        if rec["revoked"]:
            raise AuthError(f"client {client!r} has been revoked")
        return rec["secret"]

    def claim_nonce(self, client: str, nonce: str, value: str, ttl_s: int) -> str:
        """Bind ``nonce`` to ``value`` for ``ttl_s``; returns the value it was first bound to."""
        prev = self.redis.set(self.keys.nonce(client, nonce), value, nx=True, ex=max(ttl_s, 1), get=True)
        return value if prev is None else prev

    def _record(self, client: str) -> dict:
        raw = self.redis.hget(self.keys.clients, check_name(client, "client id"))
        if raw is None:
            raise NotFound(f"no client {client!r} in federation {self.keys.federation!r}")
        return json.loads(raw)
