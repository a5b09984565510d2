"""Fault 1: a worker dies mid-aggregation.

* The whole worker (main process and pool) is SIGKILLed and a new worker started, either in
  the round task (the plan computed, not stored) or in a shard (its objects written,
  ``shard_done`` not recorded). Recovery either by Celery redelivery (the unacked message
  comes back after the visibility timeout) or by the lease sweep (``chorus-mq beat`` re-sends the
  lost task under the same epoch, spending none of the round's attempts).
* Only the pool child running the shard is SIGKILLed (found with psutil); the worker survives
  and ``task_retry_on_worker_lost`` runs the shard again.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load, load_file

from chorus_mq.layout import manifest_key, round_prefix
from chorus_mq.names import ADAPTER_WEIGHTS, EventType
from chorus_mq.results import fetch_manifest
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter
from ..topology import wait_for
from .conftest import MARKS, federation, size_of, timing, trials, upload_all, wait_hook, wait_round
from .invariants import assert_exactly_once

pytestmark = MARKS


#: each kill point's hook subject (round 1; its only shard)
SUBJECTS = {"plan": 1, "shard": "1:0"}


@trials(1)
@pytest.mark.parametrize("point", ["plan", "shard"])
@pytest.mark.parametrize("recovery", ["redelivery", "sweep"])
def test_sigkill_whole_worker_mid_aggregation(deployment, delta_file, recovery, point, trial):
    fed = f"kill-{point}-{recovery}-{trial}"
    subject = SUBJECTS[point]
    if recovery == "redelivery":  # no beat: only the visibility timeout brings the task back
        env = {**timing(3, 4, 5, 120), "CHORUS_FAULT_RESTORE_INTERVAL": "0.5"}
    else:  # the message would come back only after 120 s: the lease sweep must act first
        env = {**timing(3, 4, 120, 5), "CHORUS_SWEEP_INTERVAL": "0.5"}
    deployment.env.update(env, CHORUS_FAULT_PAUSE=f"{point}=60")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    doomed = deployment.start_worker(faulty=True)
    accepted = upload_all(sdk, fed, range(3), delta_file)

    wait_hook(deployment, point, fed, subject)
    deployment.kill(doomed)  # SIGKILL to the process group: main process and pool child
    assert sdk.state.round(fed, 1).state == "aggregating"
    assert not sdk.store.exists(manifest_key(fed, 1))
    if point == "plan":  # the plan was computed and never stored
        assert sdk.state.plan(fed, 1) is None
    else:  # the shard's objects are written, its result not recorded
        assert sdk.state.plan(fed, 1) is not None and sdk.state.shards(fed, 1) == {}
        assert sdk.store.list(round_prefix(fed, 1) + "/")

    survivor = deployment.start_worker(faulty=True)
    if recovery == "sweep":
        deployment.start_beat()
    assert wait_round(deployment, fed, 1) == "complete"
    rerun = wait_hook(deployment, point, fed, subject, run=2)  # it ran again, in the new worker
    assert rerun in {c.pid for c in psutil.Process(survivor.pid).children()}
    accepted += upload_all(sdk, fed, range(3, 6), delta_file)  # the fleet goes on: round 2
    assert wait_round(deployment, fed, 2) == "complete"

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(6)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
    done = next(e for e in report.events if e["type"] == EventType.ROUND_COMPLETE and e["round"] == 1)
    # the same message (redelivery) or the sweep's re-send of it: the same epoch, no attempt spent
    assert report.reclaims == 0 and done["epoch"] == 1
    assert (sdk.state.round(fed, 1).resends >= 1) == (recovery == "sweep")


@trials(2)
def test_sigkill_pool_child_mid_aggregation(deployment, delta_file, trial):
    fed = f"child-{trial}"
    deployment.env.update(timing(4, 5, 120, 120), CHORUS_FAULT_PAUSE="shard=60", CHORUS_FAULT_RETRY_DELAY="0.2")
    sdk = deployment.sdk()
    federation(sdk, fed, quorum=3)
    worker = deployment.start_worker(faulty=True)
    accepted = upload_all(sdk, fed, range(3), delta_file)

    pid = wait_hook(deployment, "shard", fed, "1:0")
    (child,) = psutil.Process(worker.pid).children()  # concurrency 1: the one pool process
    assert child.pid == pid, f"the shard runs in pid {pid}, not in the pool child {child.pid}"
    child.send_signal(signal.SIGKILL)

    assert wait_round(deployment, fed, 1) == "complete"
    rerun = wait_hook(deployment, "shard", fed, "1:0", run=2)
    assert rerun in {c.pid for c in psutil.Process(worker.pid).children()} - {pid}
    assert worker.poll() is None, "the worker's main process should survive a lost pool child"
    wait_for(lambda: "WorkerLostError" in deployment.log(worker), 30, "the worker to report the lost child")
    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"]} and report.reclaims == 0


@trials(1)
def test_a_rolora_round_whose_worker_dies_mid_shard_stores_its_trained_factor_once(deployment, tmp_path, trial):
    """rolora round 2 (trains A against round 1's B): the worker SIGKILLed in its shard (the objects written, the
    result not recorded), a new one finishes it: the round holds lora_A only, its manifest refers to round 1's
    objects for B, and the pulled model is the float64 oracle's exact average."""
    fed = f"rolora-kill-{trial}"
    deployment.env.update(timing(3, 4, 5, 120), CHORUS_FAULT_RESTORE_INTERVAL="0.5")
    sdk = deployment.sdk()
    seeded = random_factors(7, r=4)
    initial = write_adapter(tmp_path / "initial.safetensors", {m: (a, b * 0) for m, (a, b) in seeded.items()})
    config = FederationConfig(name=fed, base_model="tiny", quorum=3, strategy="rolora", max_client_weight=1.0)
    sdk.create_federation(config, model=declared(seeded), initial_adapter=initial)
    prefix = "base_model.model."

    def deltas(r: int, trains: str) -> dict[int, Path]:
        """Three clients' deltas trained from round r - 1: ``trains`` moved, the other factor as published."""
        start = tmp_path / f"start-{r}"
        sdk.pull(fed, start, r - 1)
        held = load_file(start / ADAPTER_WEIGHTS)
        out = {}
        for i in range(3):
            g = torch.Generator().manual_seed(100 * r + i)
            factors = {}
            for m in seeded:
                a, b = held[f"{prefix}{m}.lora_A.weight"], held[f"{prefix}{m}.lora_B.weight"]
                if trains == "lora_B":
                    b = b + torch.randn(b.shape, generator=g)
                else:
                    a = a + torch.randn(a.shape, generator=g)
                factors[m] = (a, b)
            out[i] = write_adapter(tmp_path / f"r{r}-c{i}.safetensors", factors)
        return out

    first = deployment.start_worker(faulty=True)
    accepted = upload_all(sdk, fed, range(3), deltas(1, "lora_B").__getitem__)
    assert wait_round(deployment, fed, 1) == "complete"
    deployment.kill(first)  # idle: the next worker pauses in round 2's shard

    doomed = deployment.start_worker(faulty=True, env={"CHORUS_FAULT_PAUSE": "shard=60", "CHORUS_FAULT_ROUNDS": "2"})
    paths = deltas(2, "lora_A")
    accepted += upload_all(sdk, fed, range(3), paths.__getitem__)
    wait_hook(deployment, "shard", fed, "2:0")
    deployment.kill(doomed)  # its objects written, its result not recorded
    assert sdk.state.round(fed, 2).state == "aggregating" and sdk.state.shards(fed, 2) == {}
    deployment.start_worker(faulty=True)
    assert wait_round(deployment, fed, 2) == "complete"

    report = assert_exactly_once(deployment, fed, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted)
    assert report.complete == {1: ["c0", "c1", "c2"], 2: ["c0", "c1", "c2"]}
    manifest, _ = fetch_manifest(sdk.state, sdk.store, fed, 2)
    one, _ = fetch_manifest(sdk.state, sdk.store, fed, 1)
    assert manifest.frame is not None and manifest.frame.factors == ("lora_B",) and manifest.frame.round == 1
    assert manifest.frame.shards == one.frame_source(("lora_B",)).shards
    for shard in manifest.shards:
        names = set(load(sdk.store.get_bytes(shard.adapter.key)))
        assert names and all(n.endswith(".lora_A.weight") for n in names)
    out = tmp_path / "pulled"
    sdk.pull(fed, out, 2)
    got = load_file(out / ADAPTER_WEIGHTS)
    weights = {c.client_id: c.weight for c in manifest.clients}
    uploads = [load_file(paths[i]) for i in range(3)]
    for m in seeded:
        a, b = got[f"{prefix}{m}.lora_A.weight"].double(), got[f"{prefix}{m}.lora_B.weight"].double()
        want = sum(
            weights[f"c{i}"] * (u[f"{prefix}{m}.lora_B.weight"].double() @ u[f"{prefix}{m}.lora_A.weight"].double())
            for i, u in enumerate(uploads)
        )
        assert float((b @ a - want).norm() / want.norm()) <= 1e-6, m
