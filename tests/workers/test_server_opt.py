"""Server optimisers through the worker path (eager tasks, real redis-server, file:// store): the published
model is the float64 oracle's optimiser step, round after round; state is stored, recovered and collected."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation import aggregate_module
from chorus_mq.aggregation.updates import ClientUpdate
from chorus_mq.errors import ConfigError
from chorus_mq.names import ADAPTER_WEIGHTS, FED_SB_FILE, Factor, ServerOptimizer, Strategy
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import strategy_spec
from chorus_mq.workers import runtime
from chorus_mq.workers.plan import make_plan
from chorus_mq.workers.shard import compute_shard

from ..deltas import declared, make_federation, random_factors, write_adapter, write_r_adapter
from ..server_opt_oracle import PEFT_PREFIX, FederationOracle, Steps, published

HEAD = "base_model.model.score.weight"
MODULES = ("layers.0.q", "layers.0.v")


def _scaling(rank: int) -> float:
    return 8.0 / rank  # write_adapter's alpha 8


def _initial(tmp_path, heads: bool = True):
    """Round 0's adapter: small factors (B near zero, as LoRA starts) and a head."""
    factors = random_factors(99, modules=MODULES, r=4, scale=0.01)
    extras = {HEAD: torch.randn(3, 12, generator=torch.Generator().manual_seed(7))} if heads else None
    return factors, extras, write_adapter(tmp_path / "initial.safetensors", factors, extras=extras)


def _create(sdk, tmp_path, name, *, heads: bool = True, **options):
    factors, extras, path = _initial(tmp_path, heads)
    config = FederationConfig(name=name, base_model="m", quorum=3, **options)
    sdk.create_federation(config, model=declared(factors, extras), initial_adapter=path)


def _round(sdk, tmp_path, name, r, *, heads: bool = True):
    """Three clients of ranks 2, 4, 2 upload; returns (weight-less uploads, manifest weights)."""
    uploads = []
    for i in range(3):
        factors = random_factors(100 * r + i, modules=MODULES, r=(2, 4)[i % 2])
        extras = {HEAD: torch.randn(3, 12, generator=torch.Generator().manual_seed(50 * r + i))} if heads else {}
        path = write_adapter(tmp_path / f"{name}-r{r}-c{i}.safetensors", factors, extras=extras or None)
        sdk.upload(name, path, f"c{i}", dataset_size=100.0 + 37 * i)
        uploads.append((f"c{i}", factors, extras))
    return uploads


def _run(sdk, tmp_path, name, oracle, rounds, *, heads: bool = True):
    previous = tmp_path / f"{name}-pulled-0"
    sdk.pull(name, previous, 0)
    for r in range(1, rounds + 1):
        uploads = _round(sdk, tmp_path, name, r, heads=heads)
        out = tmp_path / f"{name}-pulled-{r}"
        manifest = sdk.pull(name, out, r)
        weights = {c.client_id: c.weight for c in manifest.clients}
        oracle.round([(weights[c], f, h) for c, f, h in uploads], previous, scaling=_scaling)
        assert oracle.worst_error(out) < 1e-5, f"round {r}"
        assert manifest.server_opt["previous_round"] == r - 1
        previous = out
    return previous


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        (ServerOptimizer.FEDADAM, {"server_lr": 0.02, "server_tau": 1e-2}),
        (ServerOptimizer.FEDAVGM, {"server_lr": 0.7, "server_momentum": 0.8}),
        (ServerOptimizer.FEDYOGI, {"server_lr": 0.05}),
    ],
)
@pytest.mark.parametrize("strategy", [Strategy.FEDEX_LORA, Strategy.SVD])
def test_published_model_is_the_oracles_step_over_rounds(sdk, tmp_path, optimizer, options, strategy):
    name = f"{optimizer}-{strategy}"
    _create(sdk, tmp_path, name, strategy=strategy, server_opt=optimizer, **options)
    hyper = {k.removeprefix("server_"): v for k, v in options.items() if k != "server_lr"}
    start = tmp_path / "start"
    sdk.pull(name, start, 0)
    oracle = FederationOracle(optimizer, options["server_lr"], start=start, **hyper)
    _run(sdk, tmp_path, name, oracle, rounds=3)


def test_state_objects_are_listed_recovered_and_collected(sdk, tmp_path):
    _create(sdk, tmp_path, "gc", server_opt="fedadam", server_lr=0.01)
    rt = runtime.current()
    states = {}
    for r in (1, 2, 3):
        _round(sdk, tmp_path, "gc", r)
        manifest = sdk.pull("gc", tmp_path / f"gc-{r}", r)
        (shard,) = manifest.shards
        assert shard.opt_state is not None and rt.store.exists(shard.opt_state.key)
        states[r] = shard.opt_state
        # the previous round's state is read by this round, then nothing reads it again: collected
        if r > 1:
            assert not rt.store.exists(states[r - 1].key)
    tensors = load_file(rt.store.local_copy(states[3].key, expected_sha256=states[3].sha256, max_bytes=None).path)
    q = "base_model.model.layers.0.q"
    assert sorted(tensors) == sorted(
        f"{item}.opt_{s}" for item in (q, "base_model.model.layers.0.v", HEAD) for s in "mv"
    )
    assert tensors[f"{q}.opt_m"].shape == (16, 12) and tensors[f"{HEAD}.opt_v"].shape == (3, 12)
    assert rt.state.opt_cursor("gc") == 3
    # the residual is dense: the step is not low-rank
    assert sorted(load_file(tmp_path / "gc-3" / "residual.safetensors")) == [
        "base_model.model.layers.0.q.residual",
        "base_model.model.layers.0.v.residual",
    ]


def test_a_shard_rerun_reads_the_same_previous_global_and_writes_the_same_bytes(sdk, tmp_path):
    _create(sdk, tmp_path, "rerun", server_opt="fedavgm", server_lr=0.5)
    _round(sdk, tmp_path, "rerun", 1)
    rt = runtime.current()
    manifest = sdk.pull("rerun", tmp_path / "out", 1)
    # the stored plan is gone with the round's work; rebuilt, it steps from round 0 as the first run did
    plan = dataclasses.replace(make_plan(rt, "rerun", 1), previous=manifest.server_opt["previous_round"])
    again = compute_shard(rt, "rerun", 1, 0, plan, rt.state.config("rerun"))
    assert (again.adapter, again.residual, again.opt_state) == (
        manifest.shards[0].adapter,
        manifest.shards[0].residual,
        manifest.shards[0].opt_state,
    )


def test_an_aborted_round_leaves_the_step_at_the_latest_complete_round(sdk, tmp_path):
    _create(sdk, tmp_path, "abort", server_opt="fedavgm", server_lr=0.9, server_momentum=0.5)
    start = tmp_path / "abort-pulled-0"
    sdk.pull("abort", start, 0)
    oracle = FederationOracle("fedavgm", 0.9, start=start, momentum=0.5)
    previous = _run(sdk, tmp_path, "abort", oracle, rounds=1)
    write_adapter(tmp_path / "lone.safetensors", random_factors(5, modules=MODULES), extras={HEAD: torch.ones(3, 12)})
    sdk.upload("abort", tmp_path / "lone.safetensors", "c0", dataset_size=1.0)
    sdk.abort_round("abort", round_=2, reason="test")
    uploads = _round(sdk, tmp_path, "abort", 3)
    manifest = sdk.pull("abort", tmp_path / "abort-3", 3)
    assert manifest.server_opt["previous_round"] == 1
    weights = {c.client_id: c.weight for c in manifest.clients}
    oracle.round([(weights[c], f, h) for c, f, h in uploads], previous, scaling=_scaling)
    assert oracle.worst_error(tmp_path / "abort-3") < 1e-5


def test_without_an_initial_adapter_modules_step_from_zero_and_heads_start_as_averaged(sdk, tmp_path):
    factors, extras, _ = _initial(tmp_path)
    make_federation(sdk, "bare", quorum=3, factors=factors, extras=extras, server_opt="fedadam", server_lr=0.01)
    oracle = FederationOracle("fedadam", 0.01)
    previous = None
    for r in (1, 2):
        uploads = _round(sdk, tmp_path, "bare", r)
        out = tmp_path / f"bare-{r}"
        manifest = sdk.pull("bare", out, r)
        assert manifest.server_opt["previous_round"] == (None if r == 1 else 1)
        weights = {c.client_id: c.weight for c in manifest.clients}
        oracle.round([(weights[c], f, h) for c, f, h in uploads], previous, scaling=_scaling)
        assert oracle.worst_error(out) < 1e-5
        previous = out


def test_fedavg_steps_its_factors_separately(sdk, tmp_path):
    _create(sdk, tmp_path, "avg", heads=False, strategy="fedavg", server_opt="fedavgm", server_momentum=0.5)
    previous = tmp_path / "avg-0"
    sdk.pull("avg", previous, 0)
    steps: dict[str, Steps] = {}
    for r in (1, 2):
        uploads = _round(sdk, tmp_path, "avg", r, heads=False)
        out = tmp_path / f"avg-{r}"
        manifest = sdk.pull("avg", out, r)
        weights = {c.client_id: c.weight for c in manifest.clients}
        start = load_file(previous / "adapter_model.safetensors")
        got = load_file(out / "adapter_model.safetensors")
        for module in MODULES:
            key = f"base_model.model.{module}"
            plain = aggregate_module(
                [
                    ClientUpdate(f[module][0], f[module][1], _scaling(f[module][0].shape[0]), weights[c])
                    for c, f, _ in uploads
                ],
                Strategy.FEDAVG,
            )
            for part, new in (("lora_A", plain.A), ("lora_B", plain.B)):
                old = start[f"{key}.{part}.weight"].double().numpy()  # same rank 4 and scaling 2 every round
                want = old + steps.setdefault(f"{key}.{part}", Steps("fedavgm", 1.0, momentum=0.5))(
                    new.double().numpy() - old
                )
                assert np.abs(got[f"{key}.{part}.weight"].double().numpy() - want).max() < 1e-5
        assert published(out)[0].keys() == {f"base_model.model.{m}" for m in MODULES}
        assert not load_file(out / "residual.safetensors")  # fedavg has no residual, with or without a step
        previous = out


def test_no_optimiser_publishes_what_it_did_before(sdk, tmp_path):
    """Bit for bit: the same deltas give the same objects and a manifest without the optimiser's fields."""
    for name in ("plain", "plain2"):
        _create(sdk, tmp_path, name)
        _round(sdk, tmp_path, name, 1)
    a, b = sdk.pull("plain", tmp_path / "a", 1), sdk.pull("plain2", tmp_path / "b", 1)
    assert a.server_opt is None and "opt_state" not in (tmp_path / "a" / "manifest.json").read_text()
    assert a.shards[0].adapter.sha256 == b.shards[0].adapter.sha256
    assert a.shards[0].residual.sha256 == b.shards[0].residual.sha256
    assert "server_opt" not in (tmp_path / "a" / "manifest.json").read_text()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"server_opt": "fedadam", "strategy": "stack"}, "cannot step --strategy stack"),
        ({"server_opt": "adam"}, "unknown --server-opt"),
        ({"server_lr": 0.1}, "--server-lr does not apply to --server-opt none"),
        ({"server_opt": "fedavgm", "server_beta1": 0.5}, "--server-beta1 does not apply to --server-opt fedavgm"),
        ({"server_opt": "fedadam", "server_momentum": 0.5}, "--server-momentum does not apply"),
        ({"server_opt": "fedadam", "server_lr": -1.0}, "above 0"),
        ({"server_opt": "fedyogi", "server_beta2": 1.0}, r"--server-beta2 must be in \[0, 1\)"),
    ],
)
def test_bad_server_optimiser_settings_are_refused_at_creation(options, match):
    with pytest.raises(ConfigError, match=match):
        FederationConfig(name="f", base_model="m", quorum=2, **options)


def test_the_config_round_trips_and_says_what_it_uses():
    cfg = FederationConfig(name="f", base_model="m", quorum=2, server_opt="fedyogi", server_lr=0.01, server_tau=1e-4)
    assert FederationConfig.from_hash(cfg.to_hash()) == cfg
    assert cfg.server_opt_settings() == {"optimizer": "fedyogi", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-4}
    assert FederationConfig(name="f", base_model="m", quorum=2).server_opt_settings() == {}


def test_the_sweep_collects_states_a_killed_commit_left(sdk, tmp_path, monkeypatch):
    """A commit killed between finalize and its collection leaves the older state: the sweep deletes it."""
    from chorus_mq.workers import commit
    from chorus_mq.workers.app import get_dispatcher
    from chorus_mq.workers.sweep import sweep

    monkeypatch.setattr(commit, "collect_states", lambda rt, federation: [])  # the commit "dies" before it
    _create(sdk, tmp_path, "swept", server_opt="fedavgm")
    states = []
    for r in (1, 2):
        _round(sdk, tmp_path, "swept", r)
        states.append(sdk.pull("swept", tmp_path / f"swept-{r}", r).shards[0].opt_state)
    rt = runtime.current()
    assert all(rt.store.exists(s.key) for s in states)
    report = sweep(rt, get_dispatcher(rt.settings))
    assert report.states == [("swept", 1)]
    assert not rt.store.exists(states[0].key) and rt.store.exists(states[1].key)
    assert sweep(rt, get_dispatcher(rt.settings)).states == []  # the cursor moved on: nothing to read again


@pytest.mark.parametrize("strategy", [Strategy.FFA_LORA, Strategy.ROLORA, Strategy.FED_SB])
def test_a_linear_strategy_publishes_the_oracles_step_on_its_trained_factor(sdk, tmp_path, strategy):
    """ffa-lora, rolora and fed-sb under fedadam, three rounds through the worker path: the published trained
    factor (rolora: B, then A, then B again with the state B kept while A trained) is the previous one plus
    the float64 oracle's step on (the weighted mean of the uploads minus the previous); the frame is the
    previous round's bit for bit, and no residual is ever published."""
    name = str(strategy).replace("-", "")
    spec = strategy_spec(strategy)
    g = torch.Generator().manual_seed(11)
    initial = {
        m: (torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g) if spec.sandwich else torch.zeros(16, 4))
        for m in MODULES
    }
    config = FederationConfig(
        name=name, base_model="m", quorum=3, strategy=strategy, server_opt="fedadam", server_lr=0.02, server_tau=1e-2
    )
    path = write_adapter(tmp_path / "initial.safetensors", initial)
    sdk.create_federation(config, model=declared(initial), initial_adapter=path)
    steps = {(m, f): Steps("fedadam", 0.02, tau=1e-2) for m in MODULES for f in spec.trains}
    tensors_file = FED_SB_FILE if spec.sandwich else ADAPTER_WEIGHTS
    previous = tmp_path / f"{name}-0"
    sdk.pull(name, previous, 0)
    for r in (1, 2, 3):
        trains = spec.trainable(r)
        suffix = f".{trains}.weight"
        before = load_file(previous / tensors_file)
        uploads = []
        for i in range(3):
            noise = torch.Generator().manual_seed(100 * r + i)
            factors = {}
            for m in MODULES:
                key = f"{PEFT_PREFIX}{m}"
                mine = before[key + suffix] + 0.3 * torch.randn(before[key + suffix].shape, generator=noise)
                if spec.sandwich:
                    factors[m] = mine
                else:
                    a, b = before[f"{key}.lora_A.weight"], before[f"{key}.lora_B.weight"]
                    factors[m] = (mine, b) if trains == Factor.LORA_A else (a, mine)
            file = tmp_path / f"{name}-r{r}-c{i}.safetensors"
            (write_r_adapter if spec.sandwich else write_adapter)(file, factors)
            sdk.upload(name, file, f"c{i}", dataset_size=100.0 + 37 * i)
            uploads.append(
                (
                    f"c{i}",
                    {
                        m: factors[m] if spec.sandwich else factors[m][0 if trains == Factor.LORA_A else 1]
                        for m in MODULES
                    },
                )
            )
        out = tmp_path / f"{name}-{r}"
        manifest = sdk.pull(name, out, r)
        assert manifest.server_opt["previous_round"] == r - 1
        assert all(shard.residual is None for shard in manifest.shards)
        weights = {c.client_id: c.weight for c in manifest.clients}
        after = load_file(out / tensors_file)
        for m in MODULES:
            key = f"{PEFT_PREFIX}{m}"
            old = before[key + suffix].double().numpy()
            mean = sum(weights[c] * x[m].double().numpy() for c, x in uploads)
            want = old + steps[(m, trains)](mean - old)
            got = after[key + suffix].double().numpy()
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, f"round {r} {m}"
            for frozen in {"lora_A", "lora_B"} - {str(trains)}:  # the frame, bit for bit
                assert torch.equal(after[f"{key}.{frozen}.weight"], before[f"{key}.{frozen}.weight"])
        previous = out


def test_personal_heads_under_a_server_optimiser_publish_round_0s_head_and_step_the_body(sdk, tmp_path):
    """--personal-heads with fedadam: the clients send bodies only; every round publishes round 0's head as it
    is (no state kept for it) and the body is the oracle's step, round after round (this combination used to
    leave the round aggregating: the head's state was declared and never written)."""
    from chorus_mq.names import TaskType

    options = {"server_lr": 0.02, "server_tau": 1e-2}
    _create(
        sdk,
        tmp_path,
        "heads",
        server_opt="fedadam",
        personal_heads=True,
        task_type=TaskType.SEQ_CLS,
        labels=("a", "b", "c"),
        **options,
    )
    start = tmp_path / "heads-start"
    sdk.pull("heads", start, 0)
    head0 = load_file(start / ADAPTER_WEIGHTS)[HEAD]
    oracle = FederationOracle("fedadam", 0.02, start=start, tau=1e-2)
    previous = start
    for r in (1, 2):
        uploads = _round(sdk, tmp_path, "heads", r, heads=False)
        out = tmp_path / f"heads-{r}"
        manifest = sdk.pull("heads", out, r)
        weights = {c.client_id: c.weight for c in manifest.clients}
        oracle.round([(weights[c], f, h) for c, f, h in uploads], previous, scaling=_scaling)
        assert oracle.worst_error(out) < 1e-5, f"round {r}"
        assert torch.equal(load_file(out / ADAPTER_WEIGHTS)[HEAD], head0)  # round 0's head, bit for bit
        previous = out
