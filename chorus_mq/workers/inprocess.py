"""The workers in this process: an eager deployment for ``simulate``, tests and eager SDKs.

``embedded_runtime`` builds and installs a runtime over an in-process Redis-compatible server (fakeredis with
Lua) or a given Redis, with a ``file://`` store, whose tasks run eagerly; ``drain_inbox`` runs the inbox pump
over one federation now (what an eager SDK does after appending a record); ``sweep_once`` runs the beat's sweep
once (deadlines, and a secure round's phases: what ``simulate --secure-aggregation`` calls while its clients
take part).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import redis as redis_lib

from ..settings import Settings
from ..store import Store, open_store
from . import runtime
from .app import get_dispatcher
from .pump import InboxPump
from .sweep import SweepReport, sweep


def _runtime(settings: Settings, redis: redis_lib.Redis, store: Store) -> runtime.Runtime:
    return runtime.current() if runtime.installed() else runtime.Runtime(settings, redis, store)


def drain_inbox(settings: Settings, redis: redis_lib.Redis, store: Store, federation: str) -> None:
    """Run the inbox pump over ``federation``'s inboxes and the tasks it sends, in this process."""
    InboxPump(_runtime(settings, redis, store), get_dispatcher(settings), consumer="sdk").drain(federation)


def sweep_once(settings: Settings, redis: redis_lib.Redis, store: Store) -> SweepReport:
    """One pass of the beat's sweep over every federation, and the tasks it sends, in this process."""
    return sweep(_runtime(settings, redis, store), get_dispatcher(settings))


def embedded_runtime(
    workdir: Path, *, redis_url: str | None = None, store_url: str | None = None, **settings: Any
) -> runtime.Runtime:
    """Install (and return) a runtime whose tasks run eagerly in this process: fakeredis unless ``redis_url``,
    ``workdir/store`` unless ``store_url``, no per-client Redis users."""
    redis = _redis(redis_url)
    config = Settings(
        redis_url=redis_url or "redis://embedded",
        store=store_url or f"file://{workdir}/store",
        eager=True,
        spool_dir=str(workdir / "spool"),
        client_acl="off",
        **settings,
    )
    rt = runtime.Runtime(config, redis, open_store(config.store, config))
    runtime.install(rt)
    return rt


def _redis(url: str | None) -> redis_lib.Redis:
    if url:
        return redis_lib.Redis.from_url(url, decode_responses=True)
    import fakeredis

    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    # fakeredis lacks Redis's Lua builtin redis.sha1hex, which client sampling uses: give it SHA-1
    # (tests/state/test_selection.py checks the draws agree with a real redis-server)
    client.eval("return 1", 0)  # builds the embedded server's Lua runtime
    server = client.connection_pool.connection_kwargs.get("server")
    lua = getattr(server, "_lua_runtime", None)
    if lua is not None:
        lua.globals()[b"redis"][b"sha1hex"] = lambda s: hashlib.sha1(bytes(s)).hexdigest().encode()
    return client
