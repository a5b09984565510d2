"""The compose stack's Redis ACL file, on a real redis-server: a client user can do a whole
upload (queue, events, status) but cannot touch round state, secrets or other queues."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings

from ..services import RedisServer
from ..deltas import random_factors, write_adapter

pytestmark = pytest.mark.e2e

ACL = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl"


@pytest.fixture
def acl_redis(tmp_path):
    server = RedisServer(tmp_path / "acl-redis", args=("--aclfile", str(ACL)), username="worker",
                         password="worker-dev-password").start()
    yield server
    server.stop()


def test_client_user_can_upload_and_nothing_more(acl_redis, deployment, s3_endpoint, tmp_path):
    deployment.redis_url = acl_redis.url
    deployment.env["CHORUS_REDIS_URL"] = acl_redis.url  # workers connect as the worker user
    deployment.env["CHORUS_ALLOW_UNSIGNED"] = "false"
    deployment.start_worker()
    deployment.cli("federation", "create", "fed", "--base-model", "m", "--quorum", "2")
    admin = acl_redis.client()
    secret = deployment.cli("client", "add", "alice", "--federation", "fed").stdout.strip().splitlines()[-1]
    deployment.cli("client", "add", "bob", "--federation", "fed")

    client_url = acl_redis.url_for("client", "client-dev-password")
    settings = Settings(redis_url=client_url, store=deployment.env["CHORUS_STORE"], s3_endpoint_url=s3_endpoint)
    alice = ChorusClient(settings, secret=secret)
    res = alice.upload("fed", write_adapter(tmp_path / "a.safetensors", random_factors(0)), "alice", timeout=60)
    assert res.status == "accepted"
    assert alice.status("fed")["deltas"] == 1

    as_client = redis.Redis.from_url(client_url, decode_responses=True)
    for attempt in (lambda: as_client.hset("chorus:{fed}:meta", "quorum", 1),
                    lambda: as_client.hgetall("chorus:{fed}:clients"),
                    lambda: as_client.hgetall("chorus:{fed}:secrets"),
                    lambda: as_client.lpush("chorus.aggregate", "{}"),
                    lambda: as_client.delete("chorus:{fed}:events"),
                    lambda: as_client.eval("return 1", 0),
                    lambda: as_client.flushall()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert admin.hget("chorus:{fed}:meta", "quorum") == "2"

    # the CLI works for a client user too
    env = {**deployment.env, "CHORUS_REDIS_URL": client_url, "CHORUS_CLIENT_SECRET": "wrong"}
    bad = subprocess.run([sys.executable, "-m", "chorus_mq.cli", "upload", "--federation", "fed", "--adapter",
                          str(write_adapter(tmp_path / "b.safetensors", random_factors(1))), "--client-id", "bob",
                          "--timeout", "60"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "signature" in bad.stderr
    assert alice.status("fed")["deltas"] == 1
