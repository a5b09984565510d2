"""The linear strategies (ffa-lora, rolora): one factor frozen and shared, the other averaged; exact, no residual."""

from __future__ import annotations

import pytest
import torch
from agg_oracle import rel

from chorus_mq.aggregation import ClientUpdate, aggregate_module, output_layout
from chorus_mq.aggregation.updates import ClientMeta
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import Factor, Strategy
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import all_specs, strategy_spec

torch.set_num_threads(1)
F64 = torch.float64


def _clients(trains: Factor, n: int = 4, r: int = 3, d_out: int = 9, d_in: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shared_a = torch.randn(r, d_in, generator=g)
    shared_b = torch.randn(d_out, r, generator=g)
    out = []
    for i in range(n):
        a = torch.randn(r, d_in, generator=g) if trains == Factor.LORA_A else shared_a
        b = torch.randn(d_out, r, generator=g) if trains == Factor.LORA_B else shared_b
        # different alphas: the average must weigh each client's own scaling
        out.append(ClientUpdate(A=a, B=b, scaling=(2.0 + i) / r, weight=float(1 + 3 * i)))
    return out


def _oracle(updates, absent: float = 0.0):
    total = sum(u.weight for u in updates) + absent
    return sum((u.weight / total) * u.scaling * (u.B.to(F64) @ u.A.to(F64)) for u in updates)


@pytest.mark.parametrize("strategy", [Strategy.FFA_LORA, Strategy.ROLORA])
@pytest.mark.parametrize("trains", [Factor.LORA_B, Factor.LORA_A])
@pytest.mark.parametrize("absent", [0.0, 2.5])
def test_average_of_the_trained_factor_is_the_exact_average_of_products(strategy, trains, absent):
    clients = _clients(trains)
    res = aggregate_module(clients, strategy, trains=trains, absent_weight=absent)
    assert res.residual is None
    got = res.scaling * (res.B.to(F64) @ res.A.to(F64))
    assert rel(got, _oracle(clients, absent)) < 1e-6
    frozen, published = (clients[0].A, res.A) if trains == Factor.LORA_B else (clients[0].B, res.B)
    assert torch.equal(published, frozen)  # the frozen factor is published bit for bit


def test_a_client_whose_frozen_factor_differs_is_refused():
    clients = _clients(Factor.LORA_B)
    # an equal copy (not the very tensor the others hold) is the same factor: compared by value, accepted
    copied = [ClientUpdate(A=u.A.clone(), B=u.B, scaling=u.scaling, weight=u.weight) for u in clients]
    same = aggregate_module(clients, Strategy.FFA_LORA, trains=Factor.LORA_B)
    assert torch.equal(aggregate_module(copied, Strategy.FFA_LORA, trains=Factor.LORA_B).B, same.B)
    bad = clients[2].A.clone()
    bad[0, 0] = torch.nextafter(bad[0, 0], torch.tensor(1e9))  # one ulp
    clients[2] = ClientUpdate(A=bad, B=clients[2].B, scaling=clients[2].scaling, weight=clients[2].weight)
    with pytest.raises(AggregationError, match="client #2: its lora_A differs"):
        aggregate_module(clients, Strategy.FFA_LORA, trains=Factor.LORA_B)


def test_mixed_ranks_and_coarse_outputs_are_refused():
    metas = [ClientMeta(rank=4), ClientMeta(rank=8)]
    with pytest.raises(AggregationError, match="every client has its rank; got ranks \\[4, 8\\]"):
        output_layout(Strategy.FFA_LORA, metas, 16, 16)
    with pytest.raises(AggregationError, match="publishes float32"):
        output_layout(Strategy.ROLORA, [4, 4], 16, 16, out_dtype=torch.bfloat16)
    layout = output_layout(Strategy.FFA_LORA, [4, 4], 16, 12, absent_weight=1.0)
    assert (layout.rank, layout.residual, layout.adapter_shapes) == (4, "none", ((4, 12), (16, 4)))


def test_the_round_factor_must_be_named():
    with pytest.raises(AggregationError, match="needs the round's trainable factor"):
        aggregate_module(_clients(Factor.LORA_B), Strategy.FFA_LORA)


def test_specs_say_what_each_strategy_is():
    names = {s.name for s in all_specs()}
    assert names == set(Strategy)
    ffa, rolora, fedex = (strategy_spec(s) for s in (Strategy.FFA_LORA, Strategy.ROLORA, "fedex-lora"))
    assert ffa.linear and not ffa.residual and [ffa.trainable(r) for r in (1, 2, 3)] == [Factor.LORA_B] * 3
    assert [rolora.trainable(r) for r in (1, 2, 3, 4)] == [Factor.LORA_B, Factor.LORA_A] * 2
    assert rolora.frozen(2) == Factor.LORA_B and ffa.frozen(5) == Factor.LORA_A
    assert not fedex.linear and fedex.residual and fedex.trainable(1) is None
    # only the linear strategies are maskable by secure aggregation
    assert {s.name for s in all_specs() if s.linear} == {Strategy.FFA_LORA, Strategy.ROLORA, Strategy.FED_SB}


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        ({"scaffold": True}, "--scaffold"),
        ({"robust_aggregate": "trimmed", "trim": 1}, "--robust-aggregate"),
        ({"out_rank": 4}, "--out-rank"),
    ],
)
def test_unsupported_combinations_are_refused_at_create(extra, flag):
    with pytest.raises(ConfigError, match=f"does not support {flag}"):
        FederationConfig(name="f", base_model="m", quorum=2, strategy="ffa-lora", **extra)


@pytest.mark.parametrize("strategy", ["ffa-lora", "fed-sb", "rolora"])
def test_server_side_dp_is_accepted_without_secure_aggregation(strategy):
    # the workers clip each client's step of the trained factor and noise it (aggregation/dp_linear.py)
    config = FederationConfig(
        name="f", base_model="m", quorum=2, strategy=strategy, clip_norm=1.0, dp_noise_multiplier=1.0
    )
    assert config.dp_noise_multiplier == 1.0 and not config.secure_aggregation


def test_a_linear_federation_needs_round_0():
    from chorus_mq.adapters import ModelDecl
    from chorus_mq.federation import create

    config = FederationConfig(name="f", base_model="m", quorum=2, strategy="rolora")
    decl = ModelDecl(modules={"base_model.model.layer.q": (8, 8)}, extras={}, task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="--strategy rolora needs an initial adapter \\(round 0\\)"):
        create(None, None, config, model=decl)  # refused before anything is written (no state, no store)


def test_the_relative_clip_scales_the_trained_factor_so_the_frozen_one_stays_shared():
    from chorus_mq.workers.shard import _clipped

    clients = _clients(Factor.LORA_A)
    clipped = [_clipped(c, 0.25 if i == 1 else None, Factor.LORA_A) for i, c in enumerate(clients)]
    assert all(torch.equal(c.B, clients[0].B) for c in clipped)  # B (frozen this round) untouched
    res = aggregate_module(clipped, Strategy.ROLORA, trains=Factor.LORA_A)
    want = _oracle(clipped)
    assert rel(res.scaling * (res.B.to(F64) @ res.A.to(F64)), want) < 1e-6
    assert rel(clipped[1].scaling * clipped[1].B.to(F64) @ clipped[1].A.to(F64),
               0.25 * clients[1].scaling * clients[1].B.to(F64) @ clients[1].A.to(F64)) < 1e-7  # fmt: skip


def test_the_synthetic_simulation_refuses_linear_strategies_clearly():
    from click.testing import CliRunner

    from chorus_mq.cli import main

    result = CliRunner().invoke(main, ["simulate", "--strategies", "fedex-lora,ffa-lora"])
    assert result.exit_code != 0
    assert "--strategy ffa-lora freezes a published factor" in result.output and "--model" in result.output
