"""A secure round over the production-shaped stack: the shipped ACL file (each client its own Redis user, which
reads only its own deliveries), IAM-checked S3 keys (each client writes only under its own prefix), ingest and
aggregate workers and the beat. Three clients through the SDK; the round is exact against the float64 oracle."""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib
import torch

from chorus_mq.secagg.public import RoundPublic
from chorus_mq.state import FederationKeys
from chorus_mq.state.secagg import SecAggRounds
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.test_secure_e2e import LABELS, _check_exact, _update

from ..services import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def test_secure_round_under_the_shipped_acl_and_iam(stack, tiny_bert_dir):  # noqa: F811
    torch.set_num_threads(1)
    fed = "secacl"
    stack.cli(
        "federation", "create", fed, "--base-model", str(tiny_bert_dir), "--quorum", "3", "--task", "seq-cls",
        "--labels", ",".join(LABELS), "--target-modules", "query,value", "--lora-rank", "4",
        "--strategy", "ffa-lora", "--secure-aggregation",
    )  # fmt: skip
    creds = {c: stack.add_client(fed, c) for c in ("c0", "c1", "c2")}
    operator = stack.operator()
    rounds = SecAggRounds(operator.redis, fed)
    pub = RoundPublic.from_dict(wait_for(lambda: rounds.public_params(1), 60, "round 1's secure aggregation"))
    updates = {c: _update(pub, 70 + i) for i, c in enumerate(creds)}
    failures: list[BaseException] = []

    def run(c: str) -> None:
        try:
            res = stack.client(creds[c]).secure_round(fed, c, updates[c], round_=1, timeout=120, poll=0.05)
            assert c in res.summed
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in creds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not failures, failures
    _check_exact(operator, fed, 1, pub, updates, list(creds))
    # a client's Redis user reads its own deliveries and nobody else's
    c0 = stack.client_redis(creds["c0"])
    keys = FederationKeys(fed)
    assert c0.hgetall(keys.secagg_to(1, "c0"))
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        c0.hgetall(keys.secagg_to(1, "c1"))
