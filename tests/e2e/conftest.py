"""The e2e suite's services, shared by its modules: one IAM-enforcing S3 endpoint, one redis-server with the
shipped ACL users, and one running stack (ingest worker, aggregate worker, beat). Every test works in
federations of its own, so they share the stack the way federations share a deployment."""

from __future__ import annotations

import logging

import pytest
import torch

from ..store.iamserver import enforcing_moto
from .stack import running_stack, start_acl_redis

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log drowns failure reports
torch.set_num_threads(1)  # the tests' own tensor math shares two cores with the stack's processes


@pytest.fixture(scope="session")
def iam_s3():
    """S3 + IAM (moto) that enforces policies: clients can do only what their generated policy allows."""
    with enforcing_moto() as server:
        yield server


@pytest.fixture(scope="session")
def acl_redis(tmp_path_factory):
    """A redis-server loaded with (a writable copy of) deploy/redis/users.acl."""
    server = start_acl_redis(tmp_path_factory.mktemp("acl-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(acl_redis, iam_s3, tmp_path_factory):
    """The running deployment: `worker --role ingest`, `worker --role aggregate` and `beat`."""
    with running_stack(acl_redis, iam_s3, tmp_path_factory.mktemp("stack")) as running:
        yield running
