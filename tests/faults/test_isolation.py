"""Fault 8: two federations on one worker fleet stay isolated.

The same client ids upload to both at once; the federations differ in quorum, strategy and
declared module shapes. A delta shaped for one is rejected by the other (each federation
declared its own model) and the rejection shows up only there. Events, rounds, registered
deltas and result objects never cross.
"""

from __future__ import annotations

import pytest

from chorus_mq.errors import Rejected
from chorus_mq.names import EventType

from ..deltas import make_federation, random_factors, write_adapter
from .conftest import MARKS, federation, in_threads, size_of, trials, upload, wait_round
from .invariants import assert_exactly_once, read_events

pytestmark = MARKS


@trials(2)
def test_two_federations_share_a_fleet_in_isolation(deployment, delta_file, tmp_path, trial):
    a, b = f"iso-a-{trial}", f"iso-b-{trial}"
    sdk = deployment.sdk()
    federation(sdk, a, quorum=3)
    make_federation(sdk, b, quorum=2, factors=random_factors(0, d_out=8, d_in=6), base_model="tiny", strategy="fedavg")
    small = [
        write_adapter(tmp_path / f"small{i}.safetensors", random_factors(2000 + i, d_out=8, d_in=6)) for i in range(4)
    ]
    workers = [deployment.start_worker(wait=False) for _ in range(2)]
    deployment.wait_ready(*workers)

    first_b = upload(sdk, b, "c0", small[0], size_of(0))
    # both federations at once, each filling its rounds in turn on the same two workers
    plans = {
        a: [
            [(0, delta_file(0)), (1, delta_file(1)), (2, delta_file(2))],
            [(3, delta_file(3)), (4, delta_file(4)), (5, delta_file(5))],
        ],
        b: [[(1, small[1])], [(2, small[2]), (3, small[3])]],
    }
    accepted = {a: [], b: [first_b]}
    errors = []

    def run(fed):
        try:
            for r, plan in enumerate(plans[fed], start=1):
                accepted[fed].extend(upload(sdk, fed, f"c{i}", path, size_of(i)) for i, path in plan)
                assert wait_round(deployment, fed, r) == "complete"
        except Exception as exc:  # reported below
            errors.append((fed, repr(exc)))

    in_threads(run, [(a,), (b,)])
    assert not errors, errors
    with pytest.raises(Rejected, match="the federation declares 8x6"):  # an a-shaped delta into b
        sdk.upload(b, delta_file(9), "c9", dataset_size=size_of(9), timeout=60)

    reports = {
        fed: assert_exactly_once(
            deployment, fed, sizes={f"c{i}": size_of(i) for i in range(10)}, accepted=accepted[fed]
        )
        for fed in (a, b)
    }
    assert reports[a].complete == {1: ["c0", "c1", "c2"], 2: ["c3", "c4", "c5"]}
    assert reports[b].complete == {1: ["c0", "c1"], 2: ["c2", "c3"]}
    assert [e["client"] for e in read_events(sdk.redis, b) if e["type"] == EventType.DELTA_REJECTED] == ["c9"]
    assert not [e for e in read_events(sdk.redis, a) if e["type"] == EventType.DELTA_REJECTED]
    assert sdk.status(a).current_round == 3 and sdk.status(b).current_round == 3
    objects = {fed: set(sdk.store.list(f"{fed}/")) for fed in (a, b)}
    assert objects[a] and objects[b] and not objects[a] & objects[b]
    results = {fed: {o.split("/")[-1].rsplit("-", 1)[0] for o in objects[fed] if "/rounds/" in o} for fed in (a, b)}
    # fedex-lora publishes a residual (mixed ranks); fedavg has none to publish
    assert results[a] == {"shard-000-adapter", "shard-000-residual", "manifest.json"}
    assert results[b] == {"shard-000-adapter", "manifest.json"}
