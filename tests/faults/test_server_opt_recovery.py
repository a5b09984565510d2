"""Server optimisers through worker subprocesses (redis-server, moto S3): the published model is the float64
oracle's optimiser step round after round, also when the worker running a shard is SIGKILLed mid-round
(the rerun reads the same previous global and state and writes the same bytes)."""

from __future__ import annotations

from chorus_mq.layout import manifest_key, round_prefix
from chorus_mq.names import RoundStatus
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter
from ..server_opt_oracle import FederationOracle
from .conftest import MARKS, MODULES, timing, upload_all, wait_hook, wait_round

pytestmark = MARKS


def _create(sdk, name, tmp_path, **options):
    """A federation of the tiny deltas' shapes whose round 0 is an initial adapter; its pulled directory."""
    factors = random_factors(99, modules=MODULES, r=4, scale=0.01)
    path = write_adapter(tmp_path / f"{name}-initial.safetensors", factors)
    config = FederationConfig(name=name, base_model="tiny", quorum=3, **options)
    sdk.create_federation(config, model=declared(factors), initial_adapter=path)
    start = tmp_path / f"{name}-0"
    sdk.pull(name, start, 0)
    return start


def _check(sdk, oracle, name, r, clients, previous, tmp_path):
    """Pull round ``r`` and compare it with the oracle's step on what ``clients`` uploaded (``delta_file(i)``)."""
    out = tmp_path / f"{name}-{r}"
    manifest = sdk.pull(name, out, r)
    weights = {c.client_id: c.weight for c in manifest.clients}
    uploads = [(weights[f"c{i}"], random_factors(1000 + i, modules=MODULES, r=(2, 4)[i % 2]), {}) for i in clients]
    oracle.round(uploads, previous, scaling=lambda rank: 8.0 / rank)  # delta_file's alpha 8
    error = oracle.worst_error(out)
    assert error < 1e-5, f"round {r}: {error:.2e} from the oracle's step"
    return out, manifest


def test_fedadam_rounds_through_worker_processes_are_the_oracles_step(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    previous = _create(sdk, "adam", tmp_path, server_opt="fedadam", server_lr=0.02, server_tau=1e-2)
    oracle = FederationOracle("fedadam", 0.02, start=previous, tau=1e-2)
    deployment.start_worker()
    states = []
    for r, clients in ((1, range(3)), (2, range(3, 6))):
        upload_all(sdk, "adam", clients, delta_file)
        assert wait_round(deployment, "adam", r) == "complete"
        previous, manifest = _check(sdk, oracle, "adam", r, clients, previous, tmp_path)
        assert manifest.server_opt == {
            "optimizer": "fedadam",
            "lr": 0.02,
            "beta1": 0.9,
            "beta2": 0.99,
            "tau": 1e-2,
            "previous_round": r - 1,
        }
        states.append(manifest.shards[0].opt_state)
    # round 1's state was read by round 2 and collected; round 2's waits for round 3
    assert not sdk.store.exists(states[0].key) and sdk.store.exists(states[1].key)


def test_a_worker_killed_mid_shard_still_publishes_the_oracles_step(deployment, delta_file, tmp_path):
    name = "opt-kill"
    deployment.env.update(
        timing(3, 4, 120, 5), CHORUS_SWEEP_INTERVAL="0.5", CHORUS_FAULT_PAUSE="shard=60", CHORUS_FAULT_ROUNDS="2"
    )
    sdk = deployment.sdk()
    previous = _create(sdk, name, tmp_path, server_opt="fedavgm", server_lr=0.8, server_momentum=0.9)
    oracle = FederationOracle("fedavgm", 0.8, start=previous, momentum=0.9)
    doomed = deployment.start_worker(faulty=True)
    upload_all(sdk, name, range(3), delta_file)
    assert wait_round(deployment, name, 1) == "complete"
    previous, _ = _check(sdk, oracle, name, 1, range(3), previous, tmp_path)

    upload_all(sdk, name, range(3, 6), delta_file)
    wait_hook(deployment, "shard", name, "2:0")  # round 2's objects are written, its shard not recorded
    deployment.kill(doomed)
    assert sdk.state.round(name, 2).state == RoundStatus.AGGREGATING
    assert not sdk.store.exists(manifest_key(name, 2))
    written = [k for k in sdk.store.list(round_prefix(name, 2) + "/") if "-opt-state-" in k]
    assert len(written) == 1

    deployment.start_worker(faulty=True)
    deployment.start_beat()  # the sweep re-sends the lost shard under the same epoch
    assert wait_round(deployment, name, 2) == "complete"
    wait_hook(deployment, "shard", name, "2:0", run=2)
    _, manifest = _check(sdk, oracle, name, 2, range(3, 6), previous, tmp_path)
    # the rerun read round 1's state (kept until round 2 completed) and wrote the very same bytes
    assert [manifest.shards[0].opt_state.key] == written
