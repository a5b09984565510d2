"""Server optimisers on the exact aggregate, against a float64 oracle over several rounds with state carried."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from agg_oracle import F64, make_clients, oracle, rel, total_delta

from chorus_mq.aggregation import aggregate_module
from chorus_mq.aggregation.server_opt import (
    PreviousFactors,
    ServerOptConfig,
    check_strategy,
    product_space,
    state_shapes,
    step,
    step_factors,
    step_module,
    step_tensor,
    step_trained,
)
from chorus_mq.aggregation.updates import ClientUpdate
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import Factor, ServerOptimizer, Strategy
from chorus_mq.strategy import strategy_spec

OPTIMISERS = [ServerOptimizer.FEDAVGM, ServerOptimizer.FEDADAM, ServerOptimizer.FEDYOGI]


class NumpyOracle:
    """Reddi et al.'s server updates written out in numpy float64, state carried between calls."""

    def __init__(self, cfg: ServerOptConfig):
        self.cfg = cfg
        self.m: np.ndarray | float = 0.0
        self.v: np.ndarray | float = 0.0

    def __call__(self, delta: np.ndarray) -> np.ndarray:
        c = self.cfg
        if c.optimizer == ServerOptimizer.FEDAVGM:
            self.v = c.momentum * self.v + delta
            return c.lr * self.v
        self.m = c.beta1 * self.m + (1 - c.beta1) * delta
        sq = delta**2
        if c.optimizer == ServerOptimizer.FEDADAM:
            self.v = c.beta2 * self.v + (1 - c.beta2) * sq
        else:
            self.v = self.v - (1 - c.beta2) * sq * np.sign(self.v - sq)
        return c.lr * self.m / (np.sqrt(self.v) + c.tau)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.to(F64).numpy()


@pytest.mark.parametrize("opt", OPTIMISERS)
@pytest.mark.parametrize("strategy", [Strategy.FEDEX_LORA, Strategy.SVD])
def test_product_space_step_over_rounds_equals_the_float64_oracle(opt, strategy):
    cfg = ServerOptConfig(opt, lr=0.05 if opt != ServerOptimizer.FEDAVGM else 0.8, momentum=0.7, tau=1e-2)
    ref = NumpyOracle(cfg)
    d_out, d_in = 24, 18
    gen = torch.Generator().manual_seed(5)
    previous = PreviousFactors(torch.randn(4, d_in, generator=gen), torch.randn(d_out, 4, generator=gen) * 0.1, 2.0)
    state = None
    for t in range(4):
        clients = make_clients(d_out, d_in, (2, 4, 3), seed=10 + t)
        result = aggregate_module(clients, strategy)
        stepped, state = step_module(result, previous, state, cfg)
        # on the base clients trained on: the published adapter they started from, plus the step on the
        # pseudo-gradient (the exact aggregate minus that adapter)
        want = _np(previous.product()) + ref(_np(oracle(clients)) - _np(previous.product()))
        got = _np(total_delta(stepped))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6, f"round {t}"
        # the adapter is the strategy's, untouched; the residual carries the rest, densely
        assert torch.equal(stepped.A, result.A) and torch.equal(stepped.B, result.B)
        assert stepped.residual is not None and stepped.residual.dense is not None
        assert sorted(state) == sorted(cfg.slots)
        # the next round's clients start from the published adapter: its product is the next "previous"
        previous = PreviousFactors(stepped.A, stepped.B, stepped.scaling)


def test_product_space_step_carries_the_residuals_folded_into_the_base():
    """x_t − W_0 = Σ residuals + s B_t A_t: the chain of published models is x_0 + Σ U."""
    cfg = ServerOptConfig(ServerOptimizer.FEDADAM, lr=0.02)
    ref = NumpyOracle(cfg)
    gen = torch.Generator().manual_seed(1)
    previous = PreviousFactors(torch.randn(3, 10, generator=gen), torch.randn(8, 3, generator=gen), 1.5)
    x = _np(previous.product())
    correction = np.zeros((8, 10))
    state = None
    for t in range(3):
        clients = make_clients(8, 10, (3, 3), seed=t)
        stepped, state = step_module(aggregate_module(clients), previous, state, cfg)
        x = x + ref(_np(oracle(clients)) - _np(previous.product()))
        correction += _np(stepped.residual.to_dense())
        previous = PreviousFactors(stepped.A, stepped.B, stepped.scaling)
        published = correction + _np(previous.product())
        assert np.linalg.norm(published - x) / np.linalg.norm(x) < 1e-6


def test_fedavgm_without_momentum_at_lr_1_publishes_the_exact_aggregate():
    cfg = ServerOptConfig(ServerOptimizer.FEDAVGM, lr=1.0, momentum=0.0)
    clients = make_clients(12, 9, (2, 5), seed=3)
    gen = torch.Generator().manual_seed(0)
    previous = PreviousFactors(torch.randn(2, 9, generator=gen), torch.randn(12, 2, generator=gen), 4.0)
    stepped, _ = step_module(aggregate_module(clients), previous, None, cfg)
    want = oracle(clients)
    assert float((total_delta(stepped) - want).norm() / want.norm()) < 1e-6


def test_no_previous_module_steps_from_zero():
    cfg = ServerOptConfig(ServerOptimizer.FEDADAM, lr=0.1)
    clients = make_clients(6, 5, (2, 2), seed=4)
    stepped, state = step_module(aggregate_module(clients), None, None, cfg)
    want = NumpyOracle(cfg)(_np(oracle(clients)))
    assert np.abs(_np(total_delta(stepped)) - want).max() < 1e-6
    assert set(state) == {"m", "v"}


@pytest.mark.parametrize("opt", OPTIMISERS)
def test_factor_space_step_for_fedavg_over_rounds(opt):
    cfg = ServerOptConfig(opt, lr=0.5 if opt == ServerOptimizer.FEDAVGM else 0.03)
    refs = {"lora_A": NumpyOracle(cfg), "lora_B": NumpyOracle(cfg)}
    gen = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 7, generator=gen), torch.randn(9, 4, generator=gen)
    previous = PreviousFactors(A, B, 2.0)
    state = None
    for t in range(3):
        result = aggregate_module(make_clients(9, 7, (4, 4, 4), seed=20 + t, alpha=8.0), Strategy.FEDAVG)
        stepped, state = step_factors(result, previous, state, cfg)
        a_old = _np(previous.A)
        b_old = _np(previous.B) * previous.scaling / result.scaling
        want_a = a_old + refs["lora_A"](_np(result.A) - a_old)
        want_b = b_old + refs["lora_B"](_np(result.B) - b_old)
        assert np.abs(_np(stepped.A) - want_a).max() < 1e-5 and np.abs(_np(stepped.B) - want_b).max() < 1e-5
        assert stepped.residual is None and stepped.scaling == result.scaling
        assert sorted(state) == sorted(state_shapes(cfg, (), factors=(4, 9, 7)))
        previous = PreviousFactors(stepped.A, stepped.B, stepped.scaling)


def test_factor_space_pads_a_smaller_previous_rank():
    cfg = ServerOptConfig(ServerOptimizer.FEDAVGM, lr=1.0, momentum=0.0)  # U = Δ: the result itself
    result = aggregate_module(make_clients(6, 5, (3, 3), seed=1), Strategy.FEDAVG)
    previous = PreviousFactors(torch.ones(2, 5), torch.ones(6, 2), 1.0)
    stepped, state = step_factors(result, previous, None, cfg)
    torch.testing.assert_close(stepped.A, result.A)
    torch.testing.assert_close(stepped.B, result.B)
    assert state["lora_A.v"].shape == (3, 5) and state["lora_B.v"].shape == (6, 3)


@pytest.mark.parametrize("opt", OPTIMISERS)
def test_tensor_step_over_rounds_and_a_first_round_without_previous(opt):
    cfg = ServerOptConfig(opt, lr=0.3 if opt == ServerOptimizer.FEDAVGM else 0.01)
    ref = NumpyOracle(cfg)
    gen = torch.Generator().manual_seed(8)
    first = torch.randn(3, 4, generator=gen)
    # no previous value: the average is published as it is, state at zero
    head, state = step_tensor(first, None, None, cfg)
    assert torch.equal(head, first) and all(float(s.abs().max()) == 0 for s in state.values())
    x = _np(head)
    for _ in range(3):
        new = torch.randn(3, 4, generator=gen)
        stepped, state = step_tensor(new, head, state, cfg)
        x = x + ref(_np(new) - _np(head))
        assert np.abs(_np(stepped) - x).max() < 1e-6
        head = stepped


def test_yogi_second_moment_stays_non_negative_and_moves_toward_delta_squared():
    cfg = ServerOptConfig(ServerOptimizer.FEDYOGI, lr=1.0, beta2=0.5)
    d = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=F64)
    _, state = step(d, {"m": torch.zeros(4, dtype=F64), "v": torch.tensor([4.0, 0.0, 1.0, 9.0], dtype=F64)}, cfg)
    # v > Δ²: down by (1-β2)Δ²; v < Δ²: up; v = Δ²: unchanged; Δ = 0 leaves v
    torch.testing.assert_close(state["v"], torch.tensor([3.5, 2.0, 1.0, 9.0], dtype=F64))


def test_state_of_another_shape_is_an_error():
    cfg = ServerOptConfig(ServerOptimizer.FEDADAM)
    with pytest.raises(AggregationError, match="state 'm' has shape"):
        step(torch.zeros(3, 3), {"m": torch.zeros(2, 3)}, cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adamw"}, "unknown server optimiser"),
        ({"lr": 0.0}, "above 0"),
        ({"tau": -1.0}, "above 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"lr": float("nan")}, "finite"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ServerOptConfig(**{"optimizer": ServerOptimizer.FEDADAM, **kwargs})


def test_stack_is_refused_and_fedavg_steps_in_factor_space():
    with pytest.raises(ConfigError, match="stack"):
        check_strategy(Strategy.STACK)
    for ok in (Strategy.FEDEX_LORA, Strategy.SVD, Strategy.FEDAVG):
        check_strategy(ok)
    assert not product_space(Strategy.FEDAVG) and product_space(Strategy.FEDAVG, dp=True)
    assert product_space("fedex-lora") and product_space(Strategy.SVD)
    for linear in (Strategy.FFA_LORA, Strategy.ROLORA, Strategy.FED_SB):  # they step their trained factor
        check_strategy(linear)
        assert not product_space(linear) and not product_space(linear, dp=True)  # DP noises the factor
    assert ServerOptConfig().slots == () and ServerOptConfig(ServerOptimizer.FEDAVGM).slots == ("v",)


def _linear_round(trains: Factor, frozen_a, frozen_b, seed: int, r: int = 3):
    """Three clients of one linear round: the trained factor (or Fed-SB's R) their own, the frame shared."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(3):
        a = torch.randn(r, frozen_a.shape[1], generator=g) if trains == Factor.LORA_A else frozen_a
        b = torch.randn(frozen_b.shape[0], r, generator=g) if trains == Factor.LORA_B else frozen_b
        R = torch.randn(r, r, generator=g) if trains == Factor.LORA_R else None
        out.append(ClientUpdate(A=a, B=b, R=R, scaling=2.0 / r, weight=float(1 + i)))
    return out


def _trained(x, trains: Factor):
    return {Factor.LORA_A: x.A, Factor.LORA_B: x.B, Factor.LORA_R: x.R}[trains]


@pytest.mark.parametrize("opt", OPTIMISERS)
@pytest.mark.parametrize(
    ("strategy", "schedule"),
    [
        (Strategy.FFA_LORA, [Factor.LORA_B] * 4),
        (Strategy.ROLORA, [Factor.LORA_B, Factor.LORA_A] * 2),
        (Strategy.FED_SB, [Factor.LORA_R] * 4),
    ],
)
def test_a_linear_strategy_steps_its_trained_factor_against_the_float64_oracle(opt, strategy, schedule):
    """Over four rounds: the trained factor is the previous one plus the optimiser's step on (its exact average
    minus the previous), with each factor's own state carried through the rounds it is frozen in (rolora); the
    frozen factors are the result's bit for bit, and no residual appears."""
    cfg = ServerOptConfig(opt, lr=0.05 if opt != ServerOptimizer.FEDAVGM else 0.8, momentum=0.7, tau=1e-2)
    oracles = {f: NumpyOracle(cfg) for f in set(schedule)}
    r, d_out, d_in = 3, 10, 8
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(r, d_in, generator=g), torch.zeros(d_out, r)
    R = torch.zeros(r, r) if strategy == Strategy.FED_SB else None
    if strategy == Strategy.FED_SB:
        b = torch.randn(d_out, r, generator=g)
    previous, state = PreviousFactors(a, b, 2.0 / r, R), None
    carried = strategy_spec(strategy).trains
    for t, trains in enumerate(schedule):
        clients = _linear_round(trains, previous.A, previous.B, seed=20 + t)
        result = aggregate_module(clients, strategy, trains=trains)
        stepped, state = step_trained(result, previous, state, cfg, trains, carried)
        old = _np(_trained(previous, trains))
        mean = sum(c.weight * _np(_trained(c, trains)) for c in clients) / sum(c.weight for c in clients)
        want = old + oracles[trains](mean - old)
        got = _np(_trained(stepped, trains))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-6, f"round {t}"
        for other in {Factor.LORA_A, Factor.LORA_B} - {trains}:
            assert torch.equal(_trained(stepped, other), _trained(result, other))  # the frame, bit for bit
        assert stepped.residual is None
        assert sorted(state) == sorted(f"{f}.{slot}" for f in carried for slot in cfg.slots)
        previous = PreviousFactors(stepped.A, stepped.B, stepped.scaling, stepped.R)


def test_fedavgm_on_a_frozen_frame_is_fedavgm_in_product_space():
    """With A frozen, the velocity of B mapped through ``s·(·)·A`` is product space's velocity: the same model."""
    cfg = ServerOptConfig(ServerOptimizer.FEDAVGM, lr=0.7, momentum=0.8)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 8, generator=g)
    factor_prev = PreviousFactors(a, torch.zeros(10, 3), 2.0 / 3)
    product_prev, factor_state, product_state = factor_prev, None, None
    for t in range(3):
        clients = _linear_round(Factor.LORA_B, a, factor_prev.B, seed=40 + t)
        result = aggregate_module(clients, Strategy.FFA_LORA, trains=Factor.LORA_B)
        stepped, factor_state = step_trained(result, factor_prev, factor_state, cfg, Factor.LORA_B)
        dense, product_state = step_module(result, product_prev, product_state, cfg)
        assert rel(total_delta(stepped), total_delta(dense)) < 1e-6, f"round {t}"
        factor_prev = PreviousFactors(stepped.A, stepped.B, stepped.scaling)
        # product space carries the step in a residual: the next round steps from the whole dense model
        product_prev = PreviousFactors(torch.eye(8, dtype=F64), total_delta(dense), 1.0)


def test_a_linear_step_without_its_factor_is_an_error():
    cfg = ServerOptConfig(ServerOptimizer.FEDADAM)
    clients = _linear_round(Factor.LORA_B, torch.randn(3, 8), torch.zeros(10, 3), seed=1)
    result = aggregate_module(clients, Strategy.FFA_LORA, trains=Factor.LORA_B)
    with pytest.raises(AggregationError, match="no lora_R to step"):
        step_trained(result, None, None, cfg, Factor.LORA_R)
    previous = PreviousFactors(torch.randn(3, 8), torch.zeros(11, 3), 1.0)
    with pytest.raises(AggregationError, match="previous global's lora_B has shape"):
        step_trained(result, previous, None, cfg, Factor.LORA_B)
