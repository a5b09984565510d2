"""One Redis ACL user per client: it may append to its own inbox and read its own federation's public state.

A client user (``client:<federation>:<client>``, password = the client's secret, which Redis
keeps only as its sha256) may read its federation's ``meta``, ``round:*`` (round hashes,
deltas, plan, shards), ``events`` and ``snapshots``; append to its own ``inbox:<client>`` through the
``chorus_inbox_append`` function (a selector of its own: the function's XADD and XLEN on that one key);
SUBSCRIBE to its ``live`` channel; and PING/HELLO/AUTH/CLIENT SETNAME. No other key, channel or
command: no Celery queue, no other federation, no other database (no SELECT), not ``clients``/
``secrets``/``nonce``, not reading the inbox, no EVAL, no other function, no FUNCTION LOAD, no DEL.
Managing these users takes the ``operator`` user of ``deploy/redis/users.acl``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis as redis_lib
from redis import Redis

from ..errors import ConfigError
from ..names import INBOX_APPEND_FUNCTION
from .clients import ClientRegistry
from .protocol import text
from .redis_keys import FederationKeys, client_user_prefix, client_username

log = logging.getLogger(__name__)
_warned_no_file = False

#: what a client's connection may run on its federation's public keys and channel. No SELECT: every key a
#: client may touch lives in database 0 (redis-py sends SELECT only for a URL naming another database).
CLIENT_COMMANDS = (
    # the connection handshake redis-py (and redis-cli) performs
    "ping",
    "hello",
    "auth",
    "client|setname",
    # reading its federation's public state
    "exists",
    "get",
    "hget",
    "hgetall",
    "hmget",
    "hkeys",
    "hlen",
    "hexists",
    "hscan",
    "xread",
    "xrange",
    "xrevrange",
    "subscribe",
    "unsubscribe",
)

#: what it may run on its own inbox, in a selector of their own (so none of the reads above reach the inbox):
#: the bounded append function, and the two commands that function runs, which Redis checks against the
#: caller's rights. Clients reach Redis through the gateway, which refuses a direct XADD or XLEN.
INBOX_COMMANDS = (f"fcall|{INBOX_APPEND_FUNCTION}", "xadd", "xlen")

#: commands a client's connection may send through the gateway: the first word of each command above
#: (Redis checks the rest), without the two only the append function may run
GATEWAY_COMMANDS = frozenset(
    [c.split("|")[0] for c in CLIENT_COMMANDS] + [c.split("|")[0] for c in INBOX_COMMANDS if c.startswith("fcall")]
)


@dataclass(frozen=True)
class SyncReport:
    """What :meth:`Acl.sync` did: users (re)created for active clients, users removed for the rest."""

    granted: tuple[str, ...]
    removed: tuple[str, ...]


def client_rules(federation: str, client: str, secret: str) -> list[str]:
    """The ACL SETUSER rules of ``client`` of ``federation`` whose password is ``secret``."""
    if not secret:
        raise ConfigError("a client user needs the client's secret as its password")
    k = FederationKeys(federation)
    return [
        "reset",  # off, no password, no keys, no channels, no commands: start from nothing
        "resetchannels",
        f"#{hashlib.sha256(secret.encode()).hexdigest()}",
        f"%R~{k.meta}",
        f"%R~{k.round_pattern}",
        f"%R~{k.events}",
        f"%R~{k.snapshots}",
        # secure aggregation: the client's own deliveries (its neighbours' keys and sealed shares), no one else's
        f"%R~{k.secagg_to_pattern(client)}",
        f"&{k.channel}",
        *(f"+{command}" for command in CLIENT_COMMANDS),
        f"({' '.join([f'~{k.client_inbox(client)}', *(f'+{command}' for command in INBOX_COMMANDS)])})",
        "on",
    ]


def check_client_database(base_url: str) -> None:
    """Client users cannot SELECT (a client could write where no worker reads): the federation's data must
    live in database 0, which every connection starts in."""
    db = urlsplit(base_url).path.strip("/") or "0"
    if db != "0":
        raise ConfigError(
            f"client users can only use Redis database 0 (they may not SELECT), but {base_url.rsplit('@', 1)[-1]!r} "
            f"names database {db}: run chorus-mq on database 0 (or give clients their own Redis)"
        )


def client_url(base_url: str, federation: str, client: str, secret: str) -> str:
    """``base_url`` (any credentials in it dropped) with the client's user and secret, URL-quoted."""
    parts = urlsplit(base_url)
    if not parts.hostname:
        raise ConfigError(f"{base_url!r} is not a redis:// URL with a host")
    check_client_database(base_url)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    user = quote(client_username(federation, client), safe="")
    netloc = f"{user}:{quote(secret, safe='')}@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Acl:
    """Creates and removes client users on one Redis (connect as the ``operator`` user)."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def _acl(self, *args: str) -> Any:
        return self.redis.execute_command("ACL", *args)  # type: ignore[no-untyped-call]

    @staticmethod
    def client_user(federation: str, client: str) -> str:
        """The ACL username of ``client`` in ``federation``."""
        return client_username(federation, client)

    username = client_user

    def grant(self, federation: str, client: str, secret: str) -> str:
        """Create (or reset) the client's user with exactly the rights above; returns its name."""
        user = client_username(federation, client)
        self._acl("SETUSER", user, *client_rules(federation, client, secret))
        return user

    def revoke(self, federation: str, client: str) -> bool:
        """Delete the client's user (Redis drops its open connections); False when there was none."""
        return int(self._acl("DELUSER", client_username(federation, client))) > 0

    def users(self, federation: str) -> list[str]:
        """The client users of ``federation`` that exist now."""
        prefix = client_user_prefix(federation)
        names = []
        for line in self._acl("LIST"):
            parts = text(line).split(" ", 2)
            if len(parts) >= 2 and parts[0] == "user" and parts[1].startswith(prefix):
                names.append(parts[1])
        return sorted(names)

    def sync(self, federation: str, registry: ClientRegistry | None = None) -> SyncReport:
        """Make the users match the registry: every active client's user (re)created, all others removed.

        Run after a Redis restart that lost its users (no ACL file, or one never saved).
        """
        registry = registry or ClientRegistry(self.redis, federation)
        granted = []
        for client in registry.active():
            secret = registry.secret(client)
            if secret is not None:
                granted.append(self.grant(federation, client, secret))
        removed = []
        for user in self.users(federation):
            if user not in granted:
                self._acl("DELUSER", user)
                removed.append(user)
        return SyncReport(tuple(granted), tuple(removed))

    def save(self) -> bool:
        """ACL SAVE, so users survive a restart. False (logged) when they will not: Redis runs without an
        ACL file, or cannot write it (a read-only mount); run :meth:`sync` after a restart then."""
        try:
            self._acl("SAVE")
        except redis_lib.ResponseError as exc:
            message = str(exc)
            if "not configured" in message:
                global _warned_no_file
                if not _warned_no_file:  # once per process: an operator adding many clients needs it once
                    _warned_no_file = True
                    log.warning(
                        "Redis has no ACL file: client users last until it restarts (then: `chorus-mq acl sync`)"
                    )
                return False
            if "error trying to save" in message:
                log.error(
                    "Redis could not write its ACL file (read-only?): client users last until it restarts "
                    "(then run `chorus-mq acl sync`); see the Redis log"
                )
                return False
            raise
        return True
