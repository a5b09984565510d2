"""Buffered (FedBuff) federations through worker subprocesses (redis-server, moto S3): flushes exact against a
float64 oracle that takes each delta relative to its own base version; a stale delta refused; a worker killed
mid-flush; two flushes' worth of uploads racing; beat flushing at the flush timeout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chorus_mq.errors import Rejected
from chorus_mq.names import RoundStatus
from chorus_mq.staleness import StalenessRule
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter
from ..server_opt_oracle import PEFT_PREFIX, published
from .conftest import MARKS, MODULES, in_threads, timing, upload, wait_hook, wait_round

pytestmark = MARKS


class BufferedOracle:
    """``x_v − W_0`` per module in float64, moved by ``η Σ p_i (s_i B_i A_i − s_b B_b A_b)`` each flush."""

    def __init__(self, start, lr: float, rule: str):
        self.lr, self.rule = lr, StalenessRule.parse(rule)
        self.x = published(start)[0]
        self.products = {0: published(start)[1]}  # each version's adapter product

    def flush(self, version: int, uploads: list[tuple[int, int]]) -> dict[str, float]:
        """Version ``version + 1`` from ``uploads`` [(client i, base version)] (uniform weights); returns p."""
        raw = {f"c{i}": self.rule.g(version - b) for i, b in uploads}
        total = math.fsum(raw.values())
        for name in MODULES:
            module = f"{PEFT_PREFIX}{name}"
            step = np.zeros_like(self.x[module])
            for i, b in uploads:
                A, B = random_factors(1000 + i, modules=MODULES, r=(2, 4)[i % 2])[name]
                trained = 8.0 / A.shape[0] * (B.double().numpy() @ A.double().numpy())
                step += raw[f"c{i}"] / total * (trained - self.products[b][module])
            self.x[module] = self.x[module] + self.lr * step
        return {c: g / total for c, g in raw.items()}

    def check(self, out, version: int) -> float:
        total, products, _ = published(out)
        self.products[version] = products
        return max(float(np.linalg.norm(total[m] - x) / np.linalg.norm(x)) for m, x in self.x.items())


def _create(sdk, name, tmp_path, **options):
    factors = random_factors(99, modules=MODULES, r=4, scale=0.05)
    path = write_adapter(tmp_path / f"{name}-initial.safetensors", factors)
    settings = {"quorum": 3, "relative_clip": 0.0, "weights": "uniform", "max_staleness": 2} | options
    config = FederationConfig(name=name, base_model="tiny", mode="buffered", **settings)
    sdk.create_federation(config, model=declared(factors), initial_adapter=path)
    start = tmp_path / f"{name}-0"
    sdk.pull(name, start, 0)
    return start


def _upload_all(sdk, name, uploads, delta_file):
    sdk.store.exists("warm-up")
    accepted = {}

    def one(i, b):
        try:
            accepted[i] = upload(sdk, name, f"c{i}", delta_file(i), 100.0, base_version=b)
        except BaseException as exc:  # re-raised below
            accepted[i] = exc

    in_threads(one, uploads)
    failed = {i: a for i, a in accepted.items() if isinstance(a, BaseException)}
    assert not failed, f"uploads without an acceptance: {failed}"
    return accepted


def _pull_and_check(sdk, oracle, name, v, uploads, tmp_path):
    p = oracle.flush(v - 1, uploads)
    out = tmp_path / f"{name}-{v}"
    manifest = sdk.pull(name, out, v)
    error = oracle.check(out, v)
    assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
    entries = {c.client_id: c for c in manifest.clients}
    assert sorted(entries) == sorted(p)
    for i, b in uploads:
        entry = entries[f"c{i}"]
        assert (entry.base_version, entry.staleness) == (b, v - 1 - b)
        assert math.isclose(entry.weight, p[f"c{i}"], rel_tol=1e-12)
    assert manifest.buffered == {"previous_version": v - 1, "server_lr": oracle.lr, "staleness_weight": "poly:0.5"}
    return manifest


def test_flushes_from_stale_bases_are_exact_and_a_too_stale_delta_is_refused(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    start = _create(sdk, "buf", tmp_path, server_lr=0.8, staleness_weight="poly:0.5")
    oracle = BufferedOracle(start, 0.8, "poly:0.5")
    deployment.start_worker()
    plan = {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (4, 1), (5, 0)], 3: [(6, 2), (7, 0), (8, 1)]}
    for v, uploads in plan.items():
        _upload_all(sdk, "buf", uploads, delta_file)
        assert wait_round(deployment, "buf", v) == "complete"
        _pull_and_check(sdk, oracle, "buf", v, uploads, tmp_path)
    assert sdk.state.latest_complete("buf") == 3 and sdk.state.current_round("buf") == 4
    with pytest.raises(Rejected, match=r"3 versions stale: the current version of 'buf' is 3"):
        sdk.upload("buf", delta_file(9), "c9", dataset_size=100.0, base_version=0, timeout=60)
    with pytest.raises(Rejected, match="not published yet"):
        sdk.upload("buf", delta_file(10), "c10", dataset_size=100.0, base_version=4, timeout=60)
    assert sdk.state.round("buf", 4).n == 0


def test_two_flushes_of_racing_uploads_lose_nothing_and_share_nothing(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    start = _create(sdk, "race", tmp_path)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    deployment.start_worker(concurrency=2)
    accepted = _upload_all(sdk, "race", [(i, 0) for i in range(6)], delta_file)
    assert wait_round(deployment, "race", 1) == "complete" and wait_round(deployment, "race", 2) == "complete"
    buffers = {v: sorted(sdk.state.deltas("race", v)) for v in (1, 2)}
    assert sorted(buffers[1] + buffers[2]) == [f"c{i}" for i in range(6)] and len(buffers[1]) == 3
    assert {a.round for a in accepted.values()} == {1, 2}
    for v in (1, 2):  # flush 2 moved version 1 with deltas trained from version 0: staleness 1
        uploads = [(int(c[1:]), 0) for c in buffers[v]]
        manifest = _pull_and_check(sdk, oracle, "race", v, uploads, tmp_path)
        assert {(c.client_id, c.sha256) for c in manifest.clients} == {
            (f"c{i}", accepted[i].sha256) for i, _ in uploads
        }


def test_a_worker_killed_mid_flush_loses_no_delta_and_publishes_the_oracles_version(deployment, delta_file, tmp_path):
    name = "buf-kill"
    deployment.env.update(
        timing(3, 4, 120, 5), CHORUS_SWEEP_INTERVAL="0.5", CHORUS_FAULT_PAUSE="shard=60", CHORUS_FAULT_ROUNDS="2"
    )
    sdk = deployment.sdk()
    start = _create(sdk, name, tmp_path)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    doomed = deployment.start_worker(faulty=True)
    first = [(0, 0), (1, 0), (2, 0)]
    _upload_all(sdk, name, first, delta_file)
    assert wait_round(deployment, name, 1) == "complete"
    _pull_and_check(sdk, oracle, name, 1, first, tmp_path)

    second = [(3, 1), (4, 0), (5, 1)]
    _upload_all(sdk, name, second, delta_file)
    wait_hook(deployment, "shard", name, "2:0")  # flush 2's objects are written, its shard not recorded
    deployment.kill(doomed)
    assert sdk.state.round(name, 2).state == RoundStatus.AGGREGATING
    assert sdk.state.round(name, 3).state == RoundStatus.OPEN  # the next buffer opened as flush 2 fired
    third = [(6, 1), (7, 0), (8, 1)]  # buffer 3 fills while flush 2 is stuck: it waits for version 2
    for i, b in third:  # queued now, judged by the next worker
        sdk.upload(name, delta_file(i), f"c{i}", dataset_size=100.0, base_version=b, wait=False)
    deployment.start_worker(faulty=True)
    deployment.start_beat()
    assert wait_round(deployment, name, 2) == "complete"
    _pull_and_check(sdk, oracle, name, 2, second, tmp_path)
    assert wait_round(deployment, name, 3) == "complete"
    _pull_and_check(sdk, oracle, name, 3, third, tmp_path)
    owners = {}
    for v in (1, 2, 3):
        for c in sdk.state.deltas(name, v):
            assert c not in owners
            owners[c] = v
    assert sorted(owners) == [f"c{i}" for i in range(9)]


def test_beat_flushes_at_the_timeout_with_min_buffer(deployment, delta_file, tmp_path):
    deployment.env.update(CHORUS_SWEEP_INTERVAL="0.5")
    sdk = deployment.sdk()
    start = _create(sdk, "tick", tmp_path, quorum=5, min_quorum=2, round_timeout=2)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    deployment.start_worker()
    deployment.start_beat()
    _upload_all(sdk, "tick", [(0, 0)], delta_file)
    _upload_all(sdk, "tick", [(1, 0)], delta_file)
    assert wait_round(deployment, "tick", 1, timeout=60) == "complete"
    assert sdk.state.round("tick", 1).closed_by == "deadline"
    _pull_and_check(sdk, oracle, "tick", 1, [(0, 0), (1, 0)], tmp_path)
    assert sdk.state.round("tick", 2).state == RoundStatus.OPEN


def test_a_version_that_was_never_published_cannot_be_a_base(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    _create(sdk, "gap", tmp_path, quorum=1)
    deployment.start_worker()
    _upload_all(sdk, "gap", [(0, 0)], delta_file)
    assert wait_round(deployment, "gap", 1) == "complete"
    assert sdk.state.abort("gap", 2, "operator").status == "aborted"  # buffer 2 never becomes a version
    _upload_all(sdk, "gap", [(1, 1)], delta_file)
    assert wait_round(deployment, "gap", 3) == "complete" and sdk.state.latest_complete("gap") == 3
    with pytest.raises(Rejected, match=r"version 2 was never published \(round 2 is aborted\)"):
        sdk.upload("gap", delta_file(2), "c2", dataset_size=100.0, base_version=2, timeout=60)
    _upload_all(sdk, "gap", [(3, 3)], delta_file)
    assert wait_round(deployment, "gap", 4) == "complete"
