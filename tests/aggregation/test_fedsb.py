"""Fed-SB: B and A frozen and shared, the r x r matrix R averaged; exact against a float64 oracle, no residual."""

from __future__ import annotations

import pytest
import torch
from agg_oracle import rel

from chorus_mq.aggregation import ClientUpdate, aggregate_module, output_layout
from chorus_mq.aggregation.sandwich import check_r, frame, peft_factors
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import Factor, Strategy
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import strategy_spec

torch.set_num_threads(1)
F64 = torch.float64


def _clients(n: int = 4, r: int = 3, d_out: int = 11, d_in: int = 7, seed: int = 0):
    b, a = frame(d_out, d_in, r, seed=5, module="m")
    g = torch.Generator().manual_seed(seed)
    # different alphas and weights: the average must weigh each client's own scaling
    return [
        ClientUpdate(A=a, B=b, R=torch.randn(r, r, generator=g), scaling=(2.0 + i) / r, weight=float(1 + 3 * i))
        for i in range(n)
    ]


def _oracle(updates, absent: float = 0.0):
    total = sum(u.weight for u in updates) + absent
    return sum((u.weight / total) * u.scaling * (u.B.to(F64) @ u.R.to(F64) @ u.A.to(F64)) for u in updates)


@pytest.mark.parametrize("absent", [0.0, 2.5])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_the_average_of_r_is_the_exact_average_of_the_updates(absent, n):
    clients = _clients(n=n, seed=n)
    res = aggregate_module(clients, Strategy.FED_SB, absent_weight=absent)
    assert res.residual is None and res.R is not None and res.R.shape == (3, 3)
    got = res.scaling * (res.B.to(F64) @ res.R.to(F64) @ res.A.to(F64))
    assert rel(got, _oracle(clients, absent)) < 1e-6
    # the frame is published bit for bit
    assert torch.equal(res.A, clients[0].A) and torch.equal(res.B, clients[0].B)


def test_the_peft_form_is_the_same_update():
    clients = _clients()
    res = aggregate_module(clients, Strategy.FED_SB)
    lora_a, lora_b = peft_factors(res.B, res.R, res.A)
    assert lora_a.dtype == lora_b.dtype == torch.float32 and lora_b.shape == (11, 3)
    assert rel(res.scaling * (lora_b.to(F64) @ lora_a.to(F64)), _oracle(clients)) < 1e-6


def test_a_client_whose_frame_differs_is_refused():
    clients = _clients()
    bad = clients[2].B.clone()
    bad[0, 0] = torch.nextafter(bad[0, 0], torch.tensor(1e9))  # one ulp
    c = clients[2]
    clients[2] = ClientUpdate(A=c.A, B=bad, R=c.R, scaling=c.scaling, weight=c.weight)
    with pytest.raises(AggregationError, match="client #2: its lora_B differs"):
        aggregate_module(clients, Strategy.FED_SB)


def test_an_update_without_r_or_with_the_wrong_shape_is_refused():
    clients = _clients()
    c = clients[1]
    clients[1] = ClientUpdate(A=c.A, B=c.B, scaling=c.scaling, weight=c.weight)
    with pytest.raises(AggregationError, match="client #1: fed-sb averages lora_R and this update has none"):
        aggregate_module(clients, Strategy.FED_SB)
    clients[1] = ClientUpdate(A=c.A, B=c.B, R=torch.zeros(4, 4), scaling=c.scaling, weight=c.weight)
    with pytest.raises(AggregationError, match=r"client #1: lora_R is torch.float32 \(4, 4\)"):
        aggregate_module(clients, Strategy.FED_SB)


def test_mixed_ranks_are_refused():
    with pytest.raises(AggregationError, match="every client has its rank; got ranks \\[4, 8\\]"):
        output_layout(Strategy.FED_SB, [4, 8], 16, 16)
    layout = output_layout(Strategy.FED_SB, [4, 4], 16, 12, absent_weight=1.0)
    assert (layout.rank, layout.residual) == (4, "none")


def test_check_r_names_the_module_and_the_rank():
    check_r("m", torch.zeros(4, 4), 4)
    with pytest.raises(AggregationError, match=r"module 'm': lora_R is torch.float32 \[4, 5\]; .* \[4, 4\]"):
        check_r("m", torch.zeros(4, 5), 4)
    with pytest.raises(AggregationError, match="NaN or infinite"):
        check_r("m", torch.full((2, 2), float("nan")), 2)


def test_the_default_frame_is_orthonormal_seeded_and_per_module():
    b, a = frame(32, 20, 6, seed=3, module="x.q")
    eye = torch.eye(6, dtype=F64)
    assert (b.to(F64).T @ b.to(F64) - eye).abs().max() < 1e-6
    assert (a.to(F64) @ a.to(F64).T - eye).abs().max() < 1e-6
    b2, a2 = frame(32, 20, 6, seed=3, module="x.q")
    assert torch.equal(b, b2) and torch.equal(a, a2)
    b3, _ = frame(32, 20, 6, seed=3, module="x.v")
    assert not torch.equal(b, b3)
    # ||B R A|| = ||R||: a step on R is a step of the same size on the update
    r = torch.randn(6, 6, dtype=F64)
    assert abs(float(torch.linalg.norm(b.to(F64) @ r @ a.to(F64))) / float(torch.linalg.norm(r)) - 1) < 1e-6
    with pytest.raises(AggregationError, match="rank <= min\\(d_out, d_in\\) = 20"):
        frame(32, 20, 21, seed=0, module="m")


def test_the_spec_says_fed_sb_trains_r_with_both_factors_frozen():
    spec = strategy_spec("fed-sb")
    assert spec.linear and spec.exact and not spec.residual and spec.sandwich and spec.frozen_shared
    assert [spec.trainable(r) for r in (1, 2, 3)] == [Factor.LORA_R] * 3
    assert spec.frozen(1) is None  # both are: nothing of B or A is uploaded
    assert not strategy_spec("ffa-lora").sandwich


@pytest.mark.parametrize(
    ("extra", "flag"),
    [({"scaffold": True}, "--scaffold"), ({"out_rank": 4}, "--out-rank")],
)
def test_unsupported_combinations_are_refused_at_create(extra, flag):
    with pytest.raises(ConfigError, match=f"does not support {flag}"):
        FederationConfig(name="f", base_model="m", quorum=2, strategy="fed-sb", **extra)


def test_round_0_needs_a_full_rank_frame_and_starts_r_at_zero():
    from chorus_mq.errors import IncompatibleDelta
    from chorus_mq.federation import _fed_sb_start

    b, a = frame(12, 9, 3, seed=0, module="m")
    r0 = _fed_sb_start("m", {"m.lora_A.weight": a, "m.lora_B.weight": b})
    assert r0.shape == (3, 3) and r0.dtype == torch.float32 and not r0.any()
    # PEFT's default init (B = 0) would train nothing between it: refused with the way out
    with pytest.raises(IncompatibleDelta, match=r"freezes its lora_B as the frame .* has rank below 3"):
        _fed_sb_start("m", {"m.lora_A.weight": a, "m.lora_B.weight": torch.zeros(12, 3)})
