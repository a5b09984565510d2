"""Fault 14: uploads never wait behind aggregations (issue 10).

An ingest worker and an aggregate worker run as separate processes, one pool process each.
A bigger federation's round holds the aggregate worker (its shard paused mid-way, objects
written); meanwhile an upload to another federation gets its verdict from the ingest worker.
With one pool for both, that verdict would wait until the round is done.
"""

from __future__ import annotations

import time

from chorus_mq.names import RoundStatus, WorkerRole

from ..deltas import make_federation, random_factors, write_adapter
from .conftest import MARKS, federation, size_of, upload, upload_all, wait_hook, wait_round
from .faulty_app import arrivals, release
from .invariants import assert_exactly_once

pytestmark = MARKS

#: the liveness bound on a verdict while a round aggregates (it takes a fraction of a second here)
BOUND_S = 10
BIG = tuple(f"layers.{i}.{m}" for i in range(4) for m in ("q", "v"))


def test_upload_verdict_while_another_federation_aggregates(deployment, delta_file, tmp_path, capsys):
    big, small = "big", "small"
    deployment.env.update(CHORUS_FAULT_PAUSE="shard=300", CHORUS_FAULT_FEDERATIONS=big)
    sdk = deployment.sdk()
    shape = {"d_out": 512, "d_in": 512}
    federation(sdk, small, quorum=2)
    make_federation(sdk, big, quorum=3, factors=random_factors(0, modules=BIG, **shape), base_model="tiny")
    big_deltas = {
        i: write_adapter(
            tmp_path / f"big{i}.safetensors",
            random_factors(3000 + i, modules=BIG, r=(8, 16)[i % 2], scale=0.01, **shape),
        )
        for i in range(3)
    }
    ingest = deployment.start_worker(role=WorkerRole.INGEST, wait=False)
    aggregate = deployment.start_worker(role=WorkerRole.AGGREGATE, faulty=True, wait=False)
    deployment.wait_ready(ingest, aggregate)

    accepted_big = upload_all(sdk, big, range(3), big_deltas.__getitem__)
    wait_hook(deployment, "shard", big, "1:0")  # the round holds the only aggregate process
    started = time.monotonic()
    accepted_small = [upload(sdk, small, "c0", delta_file(0), size_of(0))]
    took = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[separate pools] upload verdict in {took:.2f}s while another federation's round aggregated")
    assert sdk.state.round(big, 1).state == RoundStatus.AGGREGATING
    assert len(arrivals(sdk.redis, "shard", big, "1:0")) == 1, "the big round's shard is still in its first run"
    assert took <= BOUND_S, f"the verdict took {took:.1f}s behind an aggregation (bound {BOUND_S}s)"

    release(sdk.redis, "shard", big, "1:0")
    accepted_small.append(upload(sdk, small, "c1", delta_file(1), size_of(1)))
    assert wait_round(deployment, big, 1) == "complete" and wait_round(deployment, small, 1) == "complete"
    report = assert_exactly_once(deployment, big, sizes={f"c{i}": size_of(i) for i in range(3)}, accepted=accepted_big)
    assert report.complete == {1: ["c0", "c1", "c2"]}
    report = assert_exactly_once(
        deployment, small, sizes={f"c{i}": size_of(i) for i in range(2)}, accepted=accepted_small
    )
    assert report.complete == {1: ["c0", "c1"]}
