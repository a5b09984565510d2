"""Helpers the state tests share: a model declaration, delta records, and fakeredis's missing builtin."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import fakeredis
import redis

from chorus_mq.state import DeltaRecord, FederationConfig, RoundState

MODULES = {"base_model.model.l0.q_proj": (8, 4), "base_model.model.l0.v_proj": (8, 4)}


@dataclass(frozen=True)
class Decl:
    """What ``RoundState.create_federation`` reads of ``adapters.ModelDecl``."""

    modules: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(MODULES))
    extras: dict[str, tuple[int, ...]] = field(default_factory=dict)


def sha_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(
    client: str, sha: str | None = None, *, dataset_size: float | None = None, upload_id: str | None = None
) -> DeltaRecord:
    """A delta record as the ingest worker writes it (the object keys are placeholders)."""
    sha = sha or sha_of(client)
    return DeltaRecord(
        client_id=client,
        sha256=sha,
        size=123,
        upload_id=upload_id or f"up-{client}-{sha[:8]}",
        key=f"fed/accepted/{client}/{sha}.safetensors",
        index_key=f"fed/index/{client}/{sha}.json",
        index_sha256=sha_of("index" + sha),
        dataset_size=dataset_size,
        modules=2,
        present="3",
        rank=4,
        bytes=512,
        max_norm=1.5,
    )


def make_state(
    redis_client, *, name: str = "fed", now: float = 1000.0, lease_s: int = 100, seed: str | None = "s", **cfg
) -> RoundState:
    """A RoundState with federation ``name`` created at ``now`` (quorum 3 unless given)."""
    state = RoundState(redis_client, lease_s=lease_s)
    cfg.setdefault("quorum", 3)
    state.create_federation(FederationConfig(name=name, base_model="tiny", **cfg), Decl(), seed=seed, now=now)
    return state


def url_of(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def fake_with_sha1hex() -> fakeredis.FakeRedis:
    """fakeredis with ``redis.sha1hex``, the one Redis Lua builtin the round scripts use that it lacks.

    The stand-in is SHA-1 itself; test_selection checks that it agrees with a real redis-server.
    """
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    client.eval("return 1", 0)  # builds the server's Lua runtime
    runtime = client.connection_pool.connection_kwargs["server"]._lua_runtime
    runtime.globals()[b"redis"][b"sha1hex"] = lambda s: hashlib.sha1(bytes(s)).hexdigest().encode()
    return client
