"""Authenticates ingest messages: HMAC per registered client, fresh timestamp, single-use nonce.

Two kinds of refusal. A message whose sender cannot be established (unregistered or revoked
client, signature that does not verify) raises :class:`Unauthenticated`: it is logged and
counted, never published, so nobody can write events into a federation's stream by posing as
a client. A message that *is* from the client but cannot be accepted (stale timestamp, reused
nonce) raises :class:`AuthError`, and the client is told why.

The inbox pump runs :func:`check` (no writes) before it queues anything, so junk and forgeries
die there; the ingest task runs :func:`verify`, which adds the nonce binding. Both use the same
checks, in the same order.
"""

from __future__ import annotations

import hashlib
import time

from ..errors import AuthError, Unauthenticated
from ..messages import IngestMessage
from ..state.clients import ClientRegistry
from ..state.protocol import opt_text
from .runtime import Runtime


def _digest(msg: IngestMessage) -> str:
    """What a nonce is bound to: the signed message itself (a redelivery has the same one)."""
    return hashlib.sha256(msg.canonical() + (msg.signature or "").encode()).hexdigest()


def _sender(rt: Runtime, msg: IngestMessage) -> tuple[ClientRegistry, str | None]:
    """The registry and the client's secret (None: unregistered, development mode); raises unless the
    sender is established."""
    registry = ClientRegistry(rt.redis, msg.federation)
    try:
        secret = registry.secret(msg.client_id)
    except AuthError as exc:  # revoked
        raise Unauthenticated(str(exc)) from None
    if secret is None:
        if not rt.settings.allow_unsigned:
            raise Unauthenticated(f"client {msg.client_id!r} is not registered in federation {msg.federation!r}")
    elif not msg.signature_valid(secret):
        raise Unauthenticated("message signature does not verify: wrong secret, or the message was altered")
    return registry, secret


def _seen(registry: ClientRegistry, msg: IngestMessage) -> str | None:
    """What the message's nonce is bound to already (``digest|round``), None when it is fresh."""
    return opt_text(registry.redis.get(registry.keys.nonce(msg.client_id, msg.nonce)))


def _check_fresh(rt: Runtime, registry: ClientRegistry, msg: IngestMessage, secret: str | None) -> None:
    """A stale timestamp is refused, unless this very message was seen before (a redelivery or a re-claimed
    inbox entry is the same record, and gets the same verdict)."""
    skew = rt.settings.auth_max_skew
    if secret is not None and abs(time.time() - msg.ts) > skew:
        bound = _seen(registry, msg)
        if bound is None or bound.partition("|")[0] != _digest(msg):
            raise AuthError(f"message timestamp is more than {skew}s from the server's clock (stale or replayed)")


def check(rt: Runtime, msg: IngestMessage) -> None:
    """Raise unless ``msg`` is from whom it claims and fresh; reads only (the pump runs it on every record)."""
    registry, secret = _sender(rt, msg)
    _check_fresh(rt, registry, msg, secret)
    bound = _seen(registry, msg)
    if bound is not None and bound.partition("|")[0] != _digest(msg):
        raise AuthError("message nonce was already used by another message (replay)")


def verify(rt: Runtime, msg: IngestMessage, round_: int) -> int:
    """Raise unless ``msg`` is from whom it claims; return the round it is pinned to.

    Celery redelivers messages and the pump re-claims entries, so a nonce seen again with the
    identical message is the same record and keeps the round it was first resolved to; a replay
    cannot move a delta into a later round, and any other reuse of a nonce is refused.
    """
    registry, secret = _sender(rt, msg)
    skew = rt.settings.auth_max_skew
    if secret is None:
        # development mode (CHORUS_ALLOW_UNSIGNED): unregistered clients are trusted, but a redelivery
        # still keeps its round, for as long as the broker may redeliver (there is no timestamp check)
        ttl = max(2 * skew, 2 * rt.settings.visibility_timeout)
    else:
        _check_fresh(rt, registry, msg, secret)
        ttl = 2 * skew
    digest = _digest(msg)
    bound = registry.claim_nonce(msg.client_id, msg.nonce, f"{digest}|{round_}", ttl)
    bound_digest, _, bound_round = bound.partition("|")
    if bound_digest != digest:
        raise AuthError("message nonce was already used by another message (replay)")
    return int(bound_round)
