"""A secure round over the production-shaped stack: the shipped ACL file (each client its own Redis user, which
reads only its own deliveries), IAM-checked S3 keys (each client writes only under its own prefix), ingest and
aggregate workers and the beat. Three clients through the SDK; the round is exact against the float64 oracle."""

from __future__ import annotations

import pytest
import redis as redis_lib
import torch

from chorus_mq.state import FederationKeys
from tests.training.clients import run_clients
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.secure_rounds import check_exact, create_secure_federation, random_update, round_public

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def test_secure_round_under_the_shipped_acl_and_iam(stack, tiny_bert_dir):  # noqa: F811
    torch.set_num_threads(1)
    fed = "secacl"
    create_secure_federation(stack, tiny_bert_dir, fed, quorum=3, strategy="ffa-lora")
    creds = {c: stack.add_client(fed, c) for c in ("c0", "c1", "c2")}
    operator = stack.operator()
    pub = round_public(operator, fed, 1)
    updates = {c: random_update(pub, 70 + i) for i, c in enumerate(creds)}

    def run(c: str) -> None:
        res = stack.client(creds[c]).secure_round(fed, c, updates[c], round_=1, timeout=120, poll=0.05)
        assert c in res.summed

    run_clients(run, creds)
    check_exact(operator, fed, 1, pub, updates, list(creds))
    # a client's Redis user reads its own deliveries and nobody else's
    c0 = stack.client_redis(creds["c0"])
    keys = FederationKeys(fed)
    assert c0.hgetall(keys.secagg_to(1, "c0"))
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        c0.hgetall(keys.secagg_to(1, "c1"))
