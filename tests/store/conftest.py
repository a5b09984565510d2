"""Store fixtures: S3 stores on moto, and a ``store`` fixture parametrized over both backends.

The fault proxy in front of moto (``fault_proxy``) and ``no_backoff`` live in tests/conftest.py."""

from __future__ import annotations

import uuid

import pytest

from chorus_mq.settings import Settings
from chorus_mq.store import open_store


def _s3_store(endpoint: str, bucket: str):
    # A unique prefix per store keeps tests on the shared bucket apart.
    settings = Settings(s3_endpoint_url=endpoint, s3_region="us-east-1")
    return open_store(f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}", settings)


@pytest.fixture
def make_s3_store(s3_endpoint, s3_bucket):
    """``make_s3_store(endpoint=None, bucket=None)``: a fresh S3Store (default: moto)."""
    return lambda endpoint=None, bucket=None: _s3_store(endpoint or s3_endpoint, bucket or s3_bucket)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.services)])
def store(request, tmp_path):
    """A fresh, empty store of each kind."""
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store", Settings())
    return request.getfixturevalue("make_s3_store")()


@pytest.fixture(scope="session")
def auth_s3():
    """A dedicated moto server that enforces IAM policies on S3 (see tests/store/iamserver.py)."""
    from .iamserver import enforcing_moto

    with enforcing_moto() as server:
        yield server
