"""Client sampling on the running stack, through the real CLI: `federation create` refuses a sampled
federation that could wait on its drawn clients for ever, and the users `client add` creates cannot read
the secret seed, so two federations with the same public parameters draw differently and no client can
compute a draw before its round opens."""

from __future__ import annotations

import pytest
import redis as redis_lib

from chorus_mq.state import FederationKeys

from ..deltas import random_factors, write_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.services]

MODULES = ("layers.0.q", "layers.0.v")
CLIENTS = [f"org-{i}" for i in range(8)]


def test_sampling_needs_a_deadline_and_its_seed_stays_with_the_workers(stack, tmp_path):
    ref = str(write_adapter(tmp_path / "reference.safetensors", random_factors(0, modules=MODULES)))
    create = ("federation", "create", "--base-model", "m", "--quorum", "2", "--reference-adapter", ref)
    refused = stack.cli(*create[:2], "sample-bad", *create[2:], "--clients-per-round", "2", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr + refused.stdout
    assert "--clients-per-round 2 needs --round-timeout" in refused.stderr + refused.stdout
    assert "sample-bad" not in stack.cli("federation", "list").stdout  # nothing was created

    sampled = ("--clients-per-round", "3", "--round-timeout", "600", "--expire-policy", "expire")
    feds = ("sample-a", "sample-b")
    op = stack.operator()
    users = {}
    for fed in feds:
        stack.cli(*create[:2], fed, *create[2:], *sampled)
        users[fed] = {c: stack.add_client(fed, c) for c in CLIENTS}
        op.state.abort(fed, 1, "clients registered: draw again")  # round 2 draws from all eight

    seeds = {op.state.selection_seed(fed) for fed in feds}
    assert len(seeds) == 2
    for fed in feds:
        client = stack.client_redis(users[fed]["org-0"])
        keys = FederationKeys(fed)
        readable = [*client.hgetall(keys.meta).values(), *client.hgetall(keys.round(2)).values()]
        assert readable and not any(seed in value for seed in seeds for value in readable)
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            client.hget(keys.secrets, "selection_seed")
        assert len(op.state.round(fed, 2).selected) == 3  # the opened round's draw is public
    draws = {}
    for fed in feds:  # abort rounds 2-7: six draws each, equal by chance with probability 56**-6
        for r in range(2, 8):
            draws.setdefault(fed, []).append(op.state.round(fed, r).selected)
            op.state.abort(fed, r, "next draw")
    assert draws["sample-a"] != draws["sample-b"]
