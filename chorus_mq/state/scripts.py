"""Loads the Lua scripts (each prefixed with the shared prelude) and binds them to one Redis client."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

from redis import Redis

from .protocol import Reply, parse_reply

Arg = str | int | float


@cache
def source(name: str) -> str:
    """The full text of script ``name``: the prelude, then ``lua/<name>.lua``."""
    lua = resources.files("chorus_mq.state") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Script:
    """One script; redis-py runs it by EVALSHA and falls back to loading it after NOSCRIPT (a restart)."""

    def __init__(self, redis: Redis, name: str):
        self.name = name
        self._script = redis.register_script(source(name))

    def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        return parse_reply(self.name, self._script(keys=list(keys), args=list(args)))


class Scripts:
    """Every round script, bound to one Redis client. Each header in ``lua/`` documents KEYS, ARGV and reply."""

    def __init__(self, redis: Redis):
        self.create_federation = Script(redis, "create_federation")
        self.register_delta = Script(redis, "register_delta")
        self.close_round = Script(redis, "close_round")
        self.finalize = Script(redis, "finalize")
        self.fail_round = Script(redis, "fail_round")
        self.reclaim = Script(redis, "reclaim")
        self.redispatch = Script(redis, "redispatch")
        self.renew_lease = Script(redis, "renew_lease")
        self.extend_lease = Script(redis, "extend_lease")
        self.evict_delta = Script(redis, "evict_delta")
        self.abort_round = Script(redis, "abort_round")
        self.shard_done = Script(redis, "shard_done")
        self.emit = Script(redis, "emit")
        self.judge = Script(redis, "judge")
        self.take_tokens = Script(redis, "take_tokens")
        self.secagg_open = Script(redis, "secagg_open")
        self.secagg_submit = Script(redis, "secagg_submit")
        self.secagg_close = Script(redis, "secagg_close")
        self.secagg_fire = Script(redis, "secagg_fire")
