"""A worker SIGKILLed in a secure round's commit, after every unmask shard was recorded and the manifest written and
before the round was finalized: once the round's lease runs out the beat's sweep sends the round task again, which
sends the commit; a fresh worker runs it (adopting the manifest, finalizing once), the clients see the round
complete, and the published adapter is the exact weighted mean of their updates."""

from __future__ import annotations

from chorus_mq.layout import round_prefix
from chorus_mq.names import EventType
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.secure_rounds import check_exact

from ..topology import wait_for
from .conftest import MARKS, wait_hook
from .secure_round import CLIENTS, start_secure_round

pytestmark = MARKS


def test_worker_killed_between_manifest_and_finalize_of_a_secure_round(deployment, tiny_bert_dir):  # noqa: F811
    fed = "seckill"
    lease = {"CHORUS_AGGREGATION_LEASE": "4"}  # the lease sweep sends a dead commit again after 4 s
    pause = {"CHORUS_FAULT_PAUSE": "secure_publish=120"}
    run = start_secure_round(deployment, tiny_bert_dir, fed, env=lease, pause=pause, seed=20)
    operator = run.operator
    wait_hook(deployment, "secure_publish", fed, 1, timeout=120)  # paused: the manifest written, not finalized
    deployment.kill(run.worker)
    info = operator.state.round(fed, 1)
    assert info.state == "aggregating" and info.closed_by == "secure_aggregation"  # fired, not finalized
    deployment.start_worker(env=lease)  # a fresh worker; the beat's lease sweep sends the publish again
    deployment.start_beat(env=run.sweep)
    results = run.clients.join(timeout=240)
    assert all(c in res.summed for c, res in results.items()), results
    wait_for(lambda: operator.state.round(fed, 1).state == "complete", 60, "round 1 to complete")
    check_exact(operator, fed, 1, run.pub, run.updates, CLIENTS)
    manifests = [k for k in operator.store.list(round_prefix(fed, 1)) if k.endswith("manifest.json")]
    assert len(manifests) == 1
    completes = [e for e in operator.state.events(fed).read() if e.type == EventType.ROUND_COMPLETE and e.round == 1]
    assert len(completes) == 1
