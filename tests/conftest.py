"""Shared fixtures. Services are real and private to the session; none is ever silently skipped."""

from __future__ import annotations

import os

import pytest

from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings
from chorus_mq.store import open_store
from chorus_mq.workers import runtime

from .services import RedisServer
from .store.s3server import BUCKET, FaultProxy, moto_s3
from .topology import Deployment, deployment_env

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


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.services)])
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
        overrides.setdefault("allow_unsigned", True)  # development mode unless a test is about identity
        overrides.setdefault("client_acl", "off")  # per-client Redis users are tested where they matter
        settings = Settings(
            redis_url=redis_server.url,
            store=f"file://{tmp_path}/store",
            eager=True,
            spool_dir=str(tmp_path / "spool"),
            **overrides,
        )
        rt = runtime.Runtime(settings, real_redis, open_store(settings.store, settings))
        runtime.install(rt)
        return ChorusClient(settings, redis=real_redis, store=rt.store, secret=secret)

    yield make
    runtime.install(None)


@pytest.fixture
def sdk(make_sdk):
    return make_sdk()


@pytest.fixture(scope="session")
def _proxy_server(s3_endpoint):
    with FaultProxy(s3_endpoint).running() as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(_proxy_server):
    """A FaultProxy to moto, reset: no faults pending, counters at zero."""
    _proxy_server.fail_next(0)
    yield _proxy_server
    _proxy_server.fail_next(0)


@pytest.fixture
def no_backoff(monkeypatch):
    """Zero the S3 store's retry sleeps so retry tests stay fast.

    Only the waiting goes: which errors are retried and how often is still decided by
    the production client config.
    """
    from chorus_mq.store.s3 import S3Transport

    monkeypatch.setattr(S3Transport, "delay", lambda self, attempt: 0.0)


@pytest.fixture
def deployment(redis_server, s3_endpoint, s3_bucket, tmp_path):
    """A clean deployment: Redis flushed, a fresh store prefix, no processes yet (see tests/topology.py)."""
    redis_server.client().flushall()
    dep = Deployment(deployment_env(redis_server.url, s3_endpoint, s3_bucket, tmp_path), tmp_path, redis_server.url)
    yield dep
    dep.stop_workers()


def pytest_runtest_teardown(item):
    """Fail the test that leaves transformers' process-wide loader patches in place.

    transformers 5 swaps ``PreTrainedModel.tie_weights``/``init_weights`` and ``torch.nn.init`` while it
    builds a model; a race between two loading threads once left them swapped, and GPT-2 tests ~1,600
    tests later read an uninitialised ``lm_head``. This names the test that did it instead.
    """
    import sys

    if "transformers.initialization" not in sys.modules:
        return
    import torch
    from transformers import PreTrainedModel
    from transformers.initialization import TORCH_INIT_FUNCTIONS

    swapped = [name for name in ("tie_weights", "init_weights") if getattr(PreTrainedModel, name).__name__ != name]
    swapped += [f"torch.nn.init.{n}" for n, f in TORCH_INIT_FUNCTIONS.items() if getattr(torch.nn.init, n) is not f]
    assert not swapped, f"{item.nodeid} left transformers' load-time stand-ins in place: {swapped}"
