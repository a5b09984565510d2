"""The compose stack's Redis users on a real redis-server loaded with deploy/redis/users.acl: the user
`chorus-mq client add` creates for a client can do a whole upload (its inbox, events, status, pull) and
cannot touch round state, secrets, queues or anyone else's inbox; a wrong secret gets nothing."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from ..deltas import declared, random_factors, write_adapter
from .stack import acl_passwords

pytestmark = [pytest.mark.e2e, pytest.mark.services]

MODULES = ("layers.0.q", "layers.0.v")


def test_client_user_can_upload_and_nothing_more(stack, tmp_path):
    from chorus_mq.state import FederationConfig

    fed = "acl-fed"
    stack.operator().create_federation(
        FederationConfig(name=fed, base_model="m", quorum=2), model=declared(random_factors(0, modules=MODULES))
    )
    alice = stack.add_client(fed, "alice")
    bob = stack.add_client(fed, "bob")
    assert alice.redis_url.startswith("redis://client%3Aacl-fed%3Aalice:")
    sdk = stack.client(alice)
    res = sdk.upload(
        fed,
        write_adapter(tmp_path / "a.safetensors", random_factors(1, modules=MODULES)),
        "alice",
        dataset_size=10,
        timeout=60,
    )
    assert (res.status, res.round, res.n) == ("accepted", 1, 1)
    status = sdk.status(fed)
    assert (status.deltas, status.quorum, status.state) == (1, 2, "open")

    as_alice = stack.client_redis(alice)
    k = "chorus:{acl-fed}"
    attempts = {
        "hset meta": lambda: as_alice.hset(f"{k}:meta", "quorum", 1),
        "read the registry": lambda: as_alice.hgetall(f"{k}:clients"),
        "read the secrets": lambda: as_alice.hgetall(f"{k}:secrets"),
        "lpush aggregate": lambda: as_alice.lpush("chorus.aggregate", "{}"),
        "lpush ingest": lambda: as_alice.lpush("chorus.ingest", "{}"),
        "del events": lambda: as_alice.delete(f"{k}:events"),
        "xadd events": lambda: as_alice.xadd(f"{k}:events", {"data": "{}"}),
        "xadd bob's inbox": lambda: as_alice.xadd(f"{k}:inbox:bob", {"m": "{}"}),
        "read own inbox": lambda: as_alice.xrange(f"{k}:inbox:alice"),
        "trim own inbox": lambda: as_alice.xtrim(f"{k}:inbox:alice", 0),
        "eval": lambda: as_alice.eval("return 1", 0),
        "publish": lambda: as_alice.publish(f"{k}:live", "x"),
        "keys": lambda: as_alice.keys("*"),
        "flushall": as_alice.flushall,
    }
    for what, attempt in attempts.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"a client user could {what}")
    admin = stack.operator().redis
    assert admin.hget(f"{k}:meta", "quorum") == "2" and admin.llen("chorus.aggregate") == 0

    # the CLI works for a client user: status with its own URL; a wrong secret is refused by Redis itself
    shown = stack.cli("status", "--federation", fed, as_=alice)
    assert "1/2 deltas" in shown.stdout
    wrong = dataclasses.replace(bob, secret="wrong", redis_url=bob.redis_url.replace(bob.secret, "wrong"))
    bad = stack.cli(
        "upload",
        "--federation",
        fed,
        "--adapter",
        str(write_adapter(tmp_path / "b.safetensors", random_factors(2, modules=MODULES))),
        "--client-id",
        "bob",
        "--timeout",
        "30",
        as_=wrong,
        check=False,
    )
    assert bad.returncode == 7 and "refused these credentials" in bad.stderr and "Traceback" not in bad.stderr
    # bob's real credentials complete the round
    ok = stack.cli(
        "upload",
        "--federation",
        fed,
        "--adapter",
        str(tmp_path / "b.safetensors"),
        "--client-id",
        "bob",
        "--dataset-size",
        "10",
        "--timeout",
        "60",
        as_=bob,
    )
    assert "fired" in ok.stdout or "accepted" in ok.stdout
    assert sdk.wait_round(fed, 1, timeout=120).state == "complete"
    assert set(acl_passwords()) == {"worker", "operator", "health"}  # the shipped users; no shared client user
