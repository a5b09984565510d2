"""Per-process handles (Redis, store, round state) built once from settings; replaceable in-process."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import redis as redis_lib

from ..settings import Settings, get_settings
from ..state import RoundState
from ..store import Store, open_store


@dataclass
class Runtime:
    """What every task needs: settings, a Redis client, the store and the round state over that Redis."""

    settings: Settings
    redis: redis_lib.Redis
    store: Store
    state: RoundState = field(init=False)

    def __post_init__(self) -> None:
        self.state = RoundState(self.redis, maxlen=self.settings.events_maxlen, lease_s=self.settings.aggregation_lease)

    @cached_property
    def spool(self) -> Path:
        """Where downloads and temporary outputs go (created once per process)."""
        root = Path(self.settings.spool_dir or tempfile.gettempdir()) / "chorus-spool"
        root.mkdir(parents=True, exist_ok=True)
        return root

    @cached_property
    def broker(self) -> redis_lib.Redis:
        """The Celery broker's Redis (the same server unless ``CHORUS_BROKER_URL`` says otherwise)."""
        url = self.settings.effective_broker_url
        if url == self.settings.redis_url:
            return self.redis
        return redis_lib.Redis.from_url(url, decode_responses=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        client = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
        return cls(settings, client, open_store(settings.store, settings))


_current: Runtime | None = None


def current() -> Runtime:
    """The runtime tasks in this process use, built from the environment on first use."""
    global _current
    if _current is None:
        _current = Runtime.from_settings(get_settings())
    return _current


def installed() -> bool:
    """Whether a runtime was installed (or built) in this process."""
    return _current is not None


def install(runtime: Runtime | None) -> None:
    """Use ``runtime`` for tasks run in this process (``simulate`` and tests)."""
    global _current
    _current = runtime
