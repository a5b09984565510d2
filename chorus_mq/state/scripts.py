"""Loads the Lua scripts (each prefixed with the shared prelude) and registers them with a client."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from redis import Redis

NAMES = (
    "create_federation",
    "register_delta",
    "close_round",
    "finalize",
    "fail_round",
    "reclaim",
    "emit",
)


@lru_cache(maxsize=None)
def source(name: str) -> str:
    lua = resources.files("chorus_mq.state") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """The scripts bound to one Redis client; redis-py falls back to EVAL after NOSCRIPT."""

    def __init__(self, redis: Redis):
        for name in NAMES:
            setattr(self, name, redis.register_script(source(name)))
