"""Store fixtures: moto over HTTP, a fault proxy in front of it, and a ``store``
fixture parametrized over both backends."""

from __future__ import annotations

import uuid

import pytest

from chorus_mq.settings import Settings
from chorus_mq.store import open_store

from .s3server import FaultProxy


def _s3_store(endpoint: str, bucket: str):
    # A unique prefix per store keeps tests on the shared bucket apart.
    settings = Settings(s3_endpoint_url=endpoint, s3_region="us-east-1")
    return open_store(f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}", settings)


@pytest.fixture
def make_s3_store(s3_endpoint, s3_bucket):
    """``make_s3_store(endpoint=None, bucket=None)``: a fresh S3Store (default: moto)."""
    return lambda endpoint=None, bucket=None: _s3_store(endpoint or s3_endpoint, bucket or s3_bucket)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A fresh, empty store of each kind."""
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store", Settings())
    return request.getfixturevalue("make_s3_store")()


@pytest.fixture(scope="session")
def _proxy_server(s3_endpoint):
    with FaultProxy(s3_endpoint).running() as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(_proxy_server):
    """A FaultProxy to moto, reset: no faults pending, counters at zero."""
    _proxy_server.fail_next(0)
    return _proxy_server


@pytest.fixture
def no_backoff(monkeypatch):
    """Zero boto3's retry sleeps (up to 1+2+4+8+16 s) so retry tests stay fast.

    Only the waiting goes: which errors are retried and how often is still decided by
    the production client config.
    """
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)
