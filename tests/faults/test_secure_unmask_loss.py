"""A worker SIGKILLed in the middle of a secure round's sharded unmask: one shard recorded, the next one's object
written and not recorded, the rest still queued. A fresh worker takes the queued shards; once the round's lease
runs out the beat's sweep sends the round task again, which sends the one shard nobody recorded; the last shard
sends the commit. Exactly once: every shard recorded once (its object the same bytes the dead worker wrote),
one manifest, one ``round_complete``, and the published adapter is the exact weighted mean of the updates."""

from __future__ import annotations

import json
import re

from chorus_mq.layout import round_prefix
from chorus_mq.names import EventType
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.secure_rounds import SHARDED, check_exact

from ..topology import wait_for
from .conftest import MARKS, wait_hook
from .faulty_app import arrivals
from .secure_round import CLIENTS, start_secure_round

pytestmark = MARKS


def test_worker_killed_mid_unmask_of_a_secure_round(deployment, tiny_bert_dir):  # noqa: F811
    fed = "secshard"
    env = {"CHORUS_AGGREGATION_LEASE": "4", **SHARDED}  # the lease sweep re-sends a dead round's work after 4 s
    pause = {"CHORUS_FAULT_PAUSE": "secure_shard=120", "CHORUS_FAULT_SHARDS": "1"}
    run = start_secure_round(deployment, tiny_bert_dir, fed, env=env, pause=pause, seed=30)
    operator = run.operator
    wait_hook(deployment, "secure_shard", fed, "1:1", timeout=120)  # paused: shard 1's object written, not recorded
    deployment.kill(run.worker)
    info = operator.state.round(fed, 1)
    assert info.state == "aggregating" and info.closed_by == "secure_aggregation"
    plan = json.loads(operator.state.plan(fed, 1))
    total = len(plan["shards"])
    assert plan["kind"] == "secure" and total > 2, plan
    assert set(operator.state.shards(fed, 1)) == {0}  # the dead worker's shard 1 is in the store, not recorded
    written = _adapter_objects(operator, fed)
    assert set(written) == {0, 1}, written
    # a fresh worker (counting arrivals at the hook, never pausing) takes the queued shards ...
    deployment.start_worker(faulty=True, env={"CHORUS_FAULT_COUNT": "secure_shard", **env})
    deployment.start_beat(env=run.sweep)  # ... and the lease sweep sends the round task again, which sends shard 1
    results = run.clients.join(timeout=240)
    assert all(c in res.summed for c, res in results.items()), results
    wait_for(lambda: operator.state.round(fed, 1).state == "complete", 60, "round 1 to complete")
    manifest = check_exact(operator, fed, 1, run.pub, run.updates, CLIENTS)
    assert [s.index for s in manifest.shards] == list(range(total))
    objects = _adapter_objects(operator, fed)
    assert all(len(keys) == 1 for keys in objects.values()) and len(objects) == total, objects  # same bytes again
    assert {s.index: s.adapter.key for s in manifest.shards} == {k: keys[0] for k, keys in objects.items()}
    assert objects[1] == written[1]
    manifests = [k for k in operator.store.list(round_prefix(fed, 1)) if k.endswith("manifest.json")]
    assert len(manifests) == 1
    events = [e for e in operator.state.events(fed).read() if e.round == 1]
    recorded = sorted(int(e.fields["shard"]) for e in events if e.type == EventType.SHARD_DONE)
    assert recorded == list(range(total))  # every shard recorded once
    assert len([e for e in events if e.type == EventType.ROUND_COMPLETE]) == 1
    redis = deployment.redis()
    dead = arrivals(redis, "secure_shard", fed, "1:0")[0]
    rerun = arrivals(redis, "secure_shard", fed, "1:1")
    assert len(rerun) >= 2 and rerun[0] == dead and dead not in rerun[1:]  # shard 1 computed again, elsewhere


def _adapter_objects(sdk, fed: str) -> dict[int, list[str]]:
    """Shard index -> the adapter objects round 1 holds for it."""
    out: dict[int, list[str]] = {}
    for key in sdk.store.list(round_prefix(fed, 1)):
        m = re.search(r"/shard-(\d{3})-adapter-", key)
        if m:
            out.setdefault(int(m.group(1)), []).append(key)
    return {k: sorted(v) for k, v in sorted(out.items())}
