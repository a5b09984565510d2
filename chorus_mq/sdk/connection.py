"""The SDK's connection, shared by both roles: settings, Redis, the round state over it, the store (opened on
first use), the signing secret, and Redis failures turned into one clear error each.
"""

from __future__ import annotations

from typing import Any

import redis as redis_lib

from ..errors import AuthError, ServiceUnavailable
from ..settings import Settings
from ..state import RoundState
from ..state.redis_keys import parse_client_username
from ..store import Store, open_store


class Connection:
    """Redis for state, events and the inbox; object storage for tensors; the credentials that sign."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: redis_lib.Redis | None = None,
        store: Store | None = None,
        secret: str | None = None,
    ):
        self.settings = settings or Settings()  # read from the environment now, not a cached copy
        self.redis = redis or redis_lib.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self._store = store
        self.state = RoundState(self.redis, maxlen=self.settings.events_maxlen, lease_s=self.settings.aggregation_lease)
        self.secret = secret or self.settings.client_secret or url_password(self.settings.redis_url)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.store, self.settings)
        return self._store

    def drain_if_eager(self, federation: str) -> None:
        """Eager settings (``simulate``, tests): run the inbox pump and the tasks it sends now, in this process."""
        if self.settings.eager:
            from ..workers.inprocess import drain_inbox

            drain_inbox(self.settings, self.redis, self.store, federation)


class service:
    """Turn an unreachable Redis into one clear ``ServiceUnavailable`` (retrying is safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, redis_lib.exceptions.AuthenticationError):
            raise AuthError(
                f"Redis refused these credentials ({redacted(self.settings.redis_url)}): check "
                "CHORUS_REDIS_URL (a client's URL comes from `chorus-mq client add`)"
            ) from None
        if isinstance(exc, redis_lib.exceptions.NoPermissionError):
            owner = url_client(self.settings.redis_url)
            whose = f" (they belong to client {owner[1]!r} of federation {owner[0]!r})" if owner else ""
            raise AuthError(
                f"Redis denied this operation to {redacted(self.settings.redis_url)}'s user{whose}: {exc}"
            ) from None
        if isinstance(exc, (redis_lib.ConnectionError, redis_lib.TimeoutError)):
            raise ServiceUnavailable(
                f"Redis at {redacted(self.settings.redis_url)} is unreachable ({exc}); "
                "retrying the same command is safe"
            ) from None


def redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else f"***@{netloc}"))


def url_client(url: str) -> tuple[str, str] | None:
    """``(federation, client)`` whose Redis user the URL names; None for any other user or none."""
    from urllib.parse import unquote, urlsplit

    user = urlsplit(url).username
    return parse_client_username(unquote(user)) if user else None


def url_password(url: str) -> str | None:
    """A client's URL carries its secret as the Redis password; it also signs the client's records."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username and parts.password and ":" in unquote(parts.username):
        return unquote(parts.password)
    return None
