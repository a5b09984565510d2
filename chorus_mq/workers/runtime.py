"""Per-process handles (Redis, store, round state) built once from settings; replaceable in-process."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib

from ..settings import Settings, get_settings
from ..state import RoundState
from ..store import Store, open_store


@dataclass
class Runtime:
    settings: Settings
    redis: redis_lib.Redis
    store: Store
    state: RoundState = field(init=False)

    def __post_init__(self):
        self.state = RoundState(self.redis, maxlen=self.settings.events_maxlen, lease_s=self.settings.aggregation_lease)

    @property
    def spool(self) -> Path:
        root = Path(self.settings.spool_dir or tempfile.gettempdir()) / "chorus-spool"
        root.mkdir(parents=True, exist_ok=True)
        return root

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        client = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
        return cls(settings, client, open_store(settings.store, settings))


_current: Runtime | None = None


def current() -> Runtime:
    global _current
    if _current is None:
        _current = Runtime.from_settings(get_settings())
    return _current


def install(runtime: Runtime | None) -> None:
    """Use ``runtime`` for tasks run in this process (``simulate`` and tests)."""
    global _current
    _current = runtime
