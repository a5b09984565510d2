"""Authenticates ingest messages: HMAC per registered client, fresh timestamp, single-use nonce.

Two kinds of refusal. A message whose sender cannot be established (unregistered or revoked
client, signature that does not verify) raises :class:`Unauthenticated`: it is logged and
counted, never published, so nobody can write events into a federation's stream by posing as
a client. A message that *is* from the client but cannot be accepted (stale timestamp, reused
nonce) raises :class:`AuthError`, and the client is told why.
"""

from __future__ import annotations

import hashlib
import time

from ..errors import AuthError, Unauthenticated
from ..messages import IngestMessage
from ..state.clients import ClientRegistry
from .runtime import Runtime


def verify(rt: Runtime, msg: IngestMessage, round_: int) -> int:
    """Raise unless ``msg`` is from whom it claims; return the round it is pinned to.

    Celery redelivers messages, so a nonce seen again with the identical message is a
    redelivery and keeps the round it was first resolved to; a replay cannot move a
    delta into a later round, and any other reuse of a nonce is refused.
    """
    registry = ClientRegistry(rt.redis, msg.federation)
    try:
        secret = registry.secret(msg.client_id)
    except AuthError as exc:  # revoked
        raise Unauthenticated(str(exc)) from None
    skew = rt.settings.auth_max_skew
    if secret is None:
        if not rt.settings.allow_unsigned:
            raise Unauthenticated(f"client {msg.client_id!r} is not registered in federation {msg.federation!r}")
        # development mode (CHORUS_ALLOW_UNSIGNED): unregistered clients are trusted, but a redelivery
        # still keeps its round, for as long as the broker may redeliver (there is no timestamp check)
        ttl = max(2 * skew, 2 * rt.settings.visibility_timeout)
    else:
        if not msg.signature_valid(secret):
            raise Unauthenticated("message signature does not verify: wrong secret, or the message was altered")
        if abs(time.time() - msg.ts) > skew:
            raise AuthError(f"message timestamp is more than {skew}s from the server's clock (stale or replayed)")
        ttl = 2 * skew
    digest = hashlib.sha256(msg.canonical() + (msg.signature or "").encode()).hexdigest()
    bound = registry.claim_nonce(msg.client_id, msg.nonce, f"{digest}|{round_}", ttl)
    bound_digest, _, bound_round = bound.partition("|")
    if bound_digest != digest:
        raise AuthError("message nonce was already used by another message (replay)")
    return int(bound_round)
