"""Shared fixtures. Services are real and private to the session; none is ever silently skipped."""

from __future__ import annotations

import os

import pytest

from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings
from chorus_mq.store import open_store
from chorus_mq.workers import runtime

from .services import RedisServer
from .store.s3server import BUCKET, moto_s3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server with AOF on a free port, for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def real_redis(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(params=["fakeredis", "redis-server"])
def any_redis(request):
    """The Lua scripts run on both: fakeredis for speed, a real server for truth."""
    if request.param == "fakeredis":
        import fakeredis
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    else:
        yield request.getfixturevalue("real_redis")


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of moto's S3 as a real HTTP server on a free loopback port, with ``s3_bucket`` created."""
    with moto_s3(BUCKET) as url:
        yield url


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    return BUCKET


@pytest.fixture
def make_sdk(real_redis, redis_server, tmp_path):
    """``make_sdk(**settings)``: a ChorusClient whose uploads run the real tasks in this process
    (real redis-server, a file:// store, Celery tasks applied eagerly)."""
    def make(secret: str | None = None, **overrides) -> ChorusClient:
        settings = Settings(redis_url=redis_server.url, store=f"file://{tmp_path}/store", eager=True,
                            spool_dir=str(tmp_path / "spool"), **overrides)
        rt = runtime.Runtime(settings, real_redis, open_store(settings.store, settings))
        runtime.install(rt)
        return ChorusClient(settings, redis=real_redis, store=rt.store, secret=secret)
    yield make
    runtime.install(None)


@pytest.fixture
def sdk(make_sdk):
    return make_sdk()
