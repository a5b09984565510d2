"""Checks and set-up a worker or beat process runs before it starts serving."""

from __future__ import annotations

import ipaddress
import logging
import threading
from urllib.parse import unquote, urlsplit

import redis as redis_lib

from ..errors import ConfigError
from ..settings import Settings
from ..state.functions import InboxLimits, load_functions, loaded

log = logging.getLogger(__name__)

#: the development passwords ``deploy/redis/users.acl`` ships (tests check this list against the file)
SHIPPED_PASSWORDS = frozenset({"worker-dev-password", "operator-dev-password", "health-dev-password"})


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a URL's host) can only be this machine: 127.0.0.0/8, ::1 or localhost."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_redis_credentials(settings: Settings) -> None:
    """Refuse to run with a shipped development password on a Redis that is not on this machine."""
    for setting, url in (("CHORUS_REDIS_URL", settings.redis_url), ("CHORUS_BROKER_URL", settings.broker_url)):
        if not url:
            continue
        parts = urlsplit(url)
        password = unquote(parts.password) if parts.password else None
        if password in SHIPPED_PASSWORDS and not is_loopback(parts.hostname):
            raise ConfigError(
                f"{setting} uses the development password {password!r} that deploy/redis/users.acl ships, for a "
                f"Redis at {parts.hostname!r}, which is not this machine: anyone who read the file could log in "
                "as this user. Give the Redis users real passwords (deploy/redis/README.md, 'Passwords') and put "
                f"them in {setting}; the shipped ones are accepted only for a Redis on 127.0.0.1, ::1 or localhost."
            )


def inbox_limits(settings: Settings) -> InboxLimits:
    return InboxLimits(settings.max_inbox_record_bytes, settings.inbox_max_records)


def ensure_functions(settings: Settings, redis: redis_lib.Redis, *, replace: bool) -> bool:
    """Load the append function library (always with ``replace``; else only where it is missing)."""
    if not replace and loaded(redis):
        return False
    return load_functions(redis, inbox_limits(settings), replace=True)


def keep_functions_loaded(
    settings: Settings, interval_s: float = 30.0, stop: threading.Event | None = None
) -> threading.Thread:
    """Load the library now (with this worker's limits) and check every ``interval_s`` that Redis still has it
    (a Redis restarted without its AOF loses it), in a daemon thread that outlives Redis outages (until
    ``stop`` is set; a worker never sets it)."""
    redis = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=10)
    stopped = stop or threading.Event()

    def run() -> None:
        replace = True
        while not stopped.is_set():
            try:
                if ensure_functions(settings, redis, replace=replace):
                    log.info("loaded the inbox append function (%s)", inbox_limits(settings))
                replace = False
            except redis_lib.RedisError as exc:
                log.warning("could not load the inbox append function yet: %s", exc)
            stopped.wait(interval_s)

    thread = threading.Thread(target=run, name="chorus-functions", daemon=True)
    thread.start()
    return thread
