"""A worker SIGKILLed in the middle of a secure round's sharded unmask: one shard recorded, the next one's object
written and not recorded, the rest still queued. A fresh worker takes the queued shards; once the round's lease
runs out the beat's sweep sends the round task again, which sends the one shard nobody recorded; the last shard
sends the commit. Exactly once: every shard recorded once (its object the same bytes the dead worker wrote),
one manifest, one ``round_complete``, and the published adapter is the exact weighted mean of the updates."""

from __future__ import annotations

import json
import re
import threading

import torch

from chorus_mq.layout import round_prefix
from chorus_mq.names import EventType
from tests.training.conftest import minilm_dir, tiny_bert_dir, tokenizer  # noqa: F401 (fixtures)
from tests.training.test_secure_e2e import LABELS, SHARDED, _check_exact, _public, _update

from ..topology import wait_for
from .conftest import MARKS, wait_hook
from .faulty_app import arrivals

pytestmark = MARKS


def test_worker_killed_mid_unmask_of_a_secure_round(deployment, tiny_bert_dir):  # noqa: F811
    torch.set_num_threads(1)
    fed = "secshard"
    clients = ["c0", "c1", "c2"]
    env = {"CHORUS_AGGREGATION_LEASE": "4", **SHARDED}  # the lease sweep re-sends a dead round's work after 4 s
    pause = {"CHORUS_FAULT_PAUSE": "secure_shard=120", "CHORUS_FAULT_SHARDS": "1"}
    worker = deployment.start_worker(faulty=True, env={**pause, **env})
    sweep = {"CHORUS_SWEEP_INTERVAL": "0.2", **env}
    beat = deployment.start_beat(env=sweep)
    deployment.cli(
        "federation", "create", fed, "--base-model", str(tiny_bert_dir), "--quorum", "3", "--task", "seq-cls",
        "--labels", ",".join(LABELS), "--target-modules", "query,value", "--lora-rank", "4",
        "--strategy", "ffa-lora", "--secure-aggregation",
    )  # fmt: skip
    operator = deployment.sdk()
    secrets = {c: operator.add_client(fed, c).secret for c in clients}
    pub = _public(operator, fed, 1)
    deployment.kill(beat)  # from here only the worker closes phases (at quorum) and unmasks
    updates = {c: _update(pub, 30 + i) for i, c in enumerate(clients)}
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
    wait_hook(deployment, "secure_shard", fed, "1:1", timeout=120)  # paused: shard 1's object written, not recorded
    deployment.kill(worker)
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
    deployment.start_beat(env=sweep)  # ... and the lease sweep sends the round task again, which sends shard 1
    for t in threads:
        t.join(timeout=240)
    assert not failures, failures
    wait_for(lambda: operator.state.round(fed, 1).state == "complete", 60, "round 1 to complete")
    manifest = _check_exact(operator, fed, 1, pub, updates, clients)
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
