"""A worker SIGKILLed in a secure round's commit, after every unmask shard was recorded and the manifest written and
before the round was finalized: once the round's lease runs out the beat's sweep sends the round task again, which
sends the commit; a fresh worker runs it (adopting the manifest, finalizing once), the clients see the round
complete, and the published adapter is the exact weighted mean of their updates."""

from __future__ import annotations

import threading

import torch

from chorus_mq.layout import round_prefix
from chorus_mq.names import EventType
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.test_secure_e2e import LABELS, _check_exact, _public, _update

from ..topology import wait_for
from .conftest import MARKS, wait_hook

pytestmark = MARKS


def test_worker_killed_between_manifest_and_finalize_of_a_secure_round(deployment, tiny_bert_dir):  # noqa: F811
    torch.set_num_threads(1)
    fed = "seckill"
    clients = ["c0", "c1", "c2"]
    lease = {"CHORUS_AGGREGATION_LEASE": "4"}  # the lease sweep sends a dead commit again after 4 s
    worker = deployment.start_worker(faulty=True, env={"CHORUS_FAULT_PAUSE": "secure_publish=120", **lease})
    sweep = {"CHORUS_SWEEP_INTERVAL": "0.2", **lease}
    beat = deployment.start_beat(env=sweep)
    deployment.cli(
        "federation", "create", fed, "--base-model", str(tiny_bert_dir), "--quorum", "3", "--task", "seq-cls",
        "--labels", ",".join(LABELS), "--target-modules", "query,value", "--lora-rank", "4",
        "--strategy", "ffa-lora", "--secure-aggregation",
    )  # fmt: skip
    operator = deployment.sdk()
    secrets = {c: operator.add_client(fed, c).secret for c in clients}
    pub = _public(operator, fed, 1)
    deployment.kill(beat)  # from here only the worker closes phases (at quorum) and publishes
    updates = {c: _update(pub, 20 + i) for i, c in enumerate(clients)}
    failures: list[BaseException] = []

    def run(c: str) -> None:
        try:
            sdk = deployment.sdk(client_secret=secrets[c])
            assert c in sdk.secure_round(fed, c, updates[c], round_=1, timeout=240, poll=0.05).summed
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    wait_hook(deployment, "secure_publish", fed, 1, timeout=120)  # paused: the manifest written, not finalized
    deployment.kill(worker)
    info = operator.state.round(fed, 1)
    assert info.state == "aggregating" and info.closed_by == "secure_aggregation"  # fired, not finalized
    deployment.start_worker(env=lease)  # a fresh worker; the beat's lease sweep sends the publish again
    deployment.start_beat(env=sweep)
    for t in threads:
        t.join(timeout=240)
    assert not failures, failures
    wait_for(lambda: operator.state.round(fed, 1).state == "complete", 60, "round 1 to complete")
    _check_exact(operator, fed, 1, pub, updates, clients)
    manifests = [k for k in operator.store.list(round_prefix(fed, 1)) if k.endswith("manifest.json")]
    assert len(manifests) == 1
    completes = [e for e in operator.state.events(fed).read() if e.type == EventType.ROUND_COMPLETE and e.round == 1]
    assert len(completes) == 1
