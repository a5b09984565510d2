"""Server optimisers on the exact aggregate: FedAvgM, FedAdam, FedYogi (Reddi et al. 2021).

Pure math on tensors. A round's pseudo-gradient ``Δ`` is how far the exact aggregate moves the
published global model; the optimiser turns it into the step ``U`` the server publishes instead,
so the new global is ``x_{t-1} + U`` (DESIGN.md section 1). For a LoRA module the step is taken
in product space (``Δ = s·B·A + R − s_p·B_p·A_p``, dense ``d_out × d_in``): the adapter stays
what the strategy produced and the residual absorbs the rest. ``fedavg`` has no residual, so
its factors step separately (:func:`step_factors`, the baseline). Tensors (a task head) step
elementwise. Everything is computed in float64; the state is a dict of named slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from chorus_mq.aggregation.updates import ModuleResult
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.factors import Residual
from chorus_mq.names import Factor, ServerOptimizer, Strategy
from chorus_mq.strategy import strategy_spec

_F64 = torch.float64

#: a state: slot name -> tensor (``v`` for FedAvgM's velocity; ``m`` and ``v`` for FedAdam/FedYogi)
State = dict[str, Tensor]


@dataclass(frozen=True)
class ServerOptConfig:
    """The server optimiser and its hyper-parameters (``federation create --server-opt ...``)."""

    optimizer: ServerOptimizer = ServerOptimizer.NONE
    lr: float = 1.0  # η
    momentum: float = 0.9  # FedAvgM's β
    beta1: float = 0.9  # FedAdam/FedYogi's first-moment decay
    beta2: float = 0.99  # their second-moment decay
    tau: float = 1e-3  # their adaptivity floor: U = η m / (√v + τ)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "optimizer", ServerOptimizer(self.optimizer))
        except ValueError:
            choices = ", ".join(ServerOptimizer.values())
            raise ConfigError(f"unknown server optimiser {self.optimizer!r}; choose one of {choices}") from None
        for name in ("lr", "momentum", "beta1", "beta2", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"server {name} must be a finite number, got {value!r}")
        if self.lr <= 0 or self.tau <= 0:
            raise ConfigError("the server learning rate and tau must be above 0")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"server {name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != ServerOptimizer.NONE

    @property
    def slots(self) -> tuple[str, ...]:
        """The state's slot names, in storage order."""
        if self.optimizer == ServerOptimizer.FEDAVGM:
            return ("v",)
        return ("m", "v") if self.enabled else ()


def check_strategy(strategy: Strategy | str) -> None:
    """ConfigError for a strategy a server optimiser cannot step: stack publishes every client's factors
    side by side, and its clients start from a rank-truncated approximation, not from the published global."""
    if not strategy_spec(strategy).server_opt:
        raise ConfigError(
            "a server optimiser needs the published global to be what clients train from; stack's clients "
            "start from an approximation of it: use fedex-lora, svd or fedavg"
        )


def product_space(strategy: Strategy | str, *, dp: bool = False) -> bool:
    """Whether a module steps in product space (with a residual): every strategy with a residual (fedavg steps
    its factors, a linear strategy its trained factor). Under DP the release is a product with a residual, but a
    linear strategy's is still its trained factor (``aggregation.dp_linear``)."""
    spec = strategy_spec(strategy)
    return not spec.linear and (dp or spec.exact)


def step(delta: Tensor, state: Mapping[str, Tensor] | None, cfg: ServerOptConfig) -> tuple[Tensor, State]:
    """The step ``U`` for pseudo-gradient ``delta`` and the new state (float64; absent slots start at 0).

    fedavgm: ``v = β v + Δ``, ``U = η v``. fedadam: ``m = β1 m + (1−β1) Δ``, ``v = β2 v + (1−β2) Δ²``,
    ``U = η m / (√v + τ)``. fedyogi: as fedadam with ``v = v − (1−β2) Δ² sign(v − Δ²)``.
    """
    if not cfg.enabled:
        return delta.to(_F64), {}
    d = delta.to(_F64)

    def slot(name: str) -> Tensor:
        prev = None if state is None else state.get(name)
        if prev is None:
            return torch.zeros_like(d)
        if tuple(prev.shape) != tuple(d.shape):
            raise AggregationError(
                f"server optimiser state {name!r} has shape {tuple(prev.shape)}, the update {tuple(d.shape)}"
            )
        return prev.to(_F64)

    if cfg.optimizer == ServerOptimizer.FEDAVGM:
        v = slot("v") * cfg.momentum + d
        return v * cfg.lr, {"v": v}
    m = slot("m") * cfg.beta1 + d * (1 - cfg.beta1)
    d2 = d * d
    v = slot("v")
    if cfg.optimizer == ServerOptimizer.FEDADAM:
        v = v * cfg.beta2 + d2 * (1 - cfg.beta2)
    else:  # fedyogi: v moves toward Δ² by a fixed fraction of Δ², never past it (v stays >= 0)
        v = v - d2 * (1 - cfg.beta2) * torch.sign(v - d2)
    return m * cfg.lr / (v.sqrt() + cfg.tau), {"m": m, "v": v}


@dataclass(frozen=True)
class PreviousFactors:
    """A module of the previous published global adapter: ``scaling · B @ A`` (Fed-SB: ``scaling · B @ R @ A``)."""

    A: Tensor
    B: Tensor
    scaling: float
    #: Fed-SB: the (r, r) matrix between the frozen frame's B and A; None: a plain LoRA module
    R: Tensor | None = None

    def product(self) -> Tensor:
        left = self.B.to(_F64) if self.R is None else self.B.to(_F64) @ self.R.to(_F64)
        return left @ self.A.to(_F64) * self.scaling


def dense_update(result: ModuleResult) -> Tensor:
    """``scaling · B @ A + residual`` in float64: what the strategy's result adds to the base."""
    out = result.B.to(_F64) @ result.A.to(_F64) * float(result.scaling)
    if result.residual is not None:
        out += result.residual.to_dense().to(_F64)
    return out


def step_module(
    result: ModuleResult, previous: PreviousFactors | None, state: Mapping[str, Tensor] | None, cfg: ServerOptConfig
) -> tuple[ModuleResult, State]:
    """Step one module in product space: the adapter stays ``result``'s; the residual becomes dense,
    ``R' = s_p B_p A_p + U − s B A``, so adapter + residual is ``x_{t-1} + U`` (``previous`` None: zero)."""
    new = dense_update(result)
    old = previous.product() if previous is not None else torch.zeros_like(new)
    if tuple(old.shape) != tuple(new.shape):
        raise AggregationError(f"previous global has shape {tuple(old.shape)}, the aggregate {tuple(new.shape)}")
    update, new_state = step(new - old, state, cfg)
    old += update
    # against the adapter as stored (its own rounding included), so adapter + residual is the step
    old.addmm_(result.B.to(_F64), result.A.to(_F64), alpha=-float(result.scaling))
    return ModuleResult(result.A, result.B, result.scaling, Residual(dense=old)), new_state


def step_factors(
    result: ModuleResult, previous: PreviousFactors | None, state: Mapping[str, Tensor] | None, cfg: ServerOptConfig
) -> tuple[ModuleResult, State]:
    """Step fedavg's A and B separately (it has no residual to absorb a product step): the previous
    factors are brought to the result's rank (zero-padded or truncated) and scaling, then
    ``A = A_p + U(A − A_p)``, ``B = B_p + U(B − B_p)``. Inexact like fedavg itself; state slots
    ``lora_A.<slot>`` and ``lora_B.<slot>``."""
    rank = int(result.A.shape[0])
    if previous is None:
        a_prev = torch.zeros_like(result.A, dtype=_F64)
        b_prev = torch.zeros_like(result.B, dtype=_F64)
    else:
        a_prev = _fit_rows(previous.A.to(_F64), rank)
        # B carries the scaling ratio, so s · B_p' A_p' = s_p B_p A_p on the kept directions
        b_prev = _fit_rows(previous.B.to(_F64).mT, rank).mT * (previous.scaling / float(result.scaling))
    parts = {}
    new_state: State = {}
    for name, new, old in (("lora_A", result.A, a_prev), ("lora_B", result.B, b_prev)):
        mine = _sub_state(state, name, rank, transposed=name == "lora_B")
        update, slots = step(new.to(_F64) - old, mine, cfg)
        parts[name] = (old + update).to(result.A.dtype)
        new_state.update({f"{name}.{k}": v for k, v in slots.items()})
    return ModuleResult(parts["lora_A"], parts["lora_B"], result.scaling, None), new_state


def step_trained(
    result: ModuleResult,
    previous: PreviousFactors | None,
    state: Mapping[str, Tensor] | None,
    cfg: ServerOptConfig,
    trained: Factor,
    carried: tuple[Factor, ...] = (),
) -> tuple[ModuleResult, State]:
    """Step a linear strategy's module (a frozen shared frame: ffa-lora, rolora, fed-sb) on the factor its
    clients trained this round, ``X = X_p + U(X − X_p)`` elementwise, state slots ``<factor>.<slot>``; every other
    factor stays the result's, bit for bit the published one, and no residual appears. ``carried``: the other
    factors the strategy trains in other rounds (rolora), whose slots pass through unchanged.

    With the frame frozen the product is linear in the trained factor, so fedavgm's step on the factor is its
    step in product space exactly; fedadam and fedyogi adapt per coordinate of the trained factor."""
    new = factor_of(result, trained)
    if new is None:
        raise AggregationError(f"the aggregate has no {trained} to step")
    old = torch.zeros_like(new, dtype=_F64) if previous is None else factor_of(previous, trained)
    if old is None:
        raise AggregationError(f"the previous global has no {trained} to step from")
    if tuple(old.shape) != tuple(new.shape):
        raise AggregationError(
            f"previous global's {trained} has shape {tuple(old.shape)}, the aggregate's {tuple(new.shape)}"
        )
    mine = {k.removeprefix(f"{trained}."): v for k, v in (state or {}).items() if k.startswith(f"{trained}.")}
    update, slots = step(new.to(_F64) - old.to(_F64), mine, cfg)
    stepped = (old.to(_F64) + update).to(new.dtype)
    new_state: State = {f"{trained}.{k}": v for k, v in slots.items()}
    for factor in carried:  # the writer's layout is sorted by name: callers write sorted(state)
        if factor != trained:
            shape = tuple(_factor_shape(result, factor))
            for slot in cfg.slots:
                kept = (state or {}).get(f"{factor}.{slot}")
                new_state[f"{factor}.{slot}"] = torch.zeros(shape, dtype=_F64) if kept is None else kept.to(_F64)
    return with_factor(result, trained, stepped), new_state


def with_factor(result: ModuleResult, which: Factor, tensor: Tensor) -> ModuleResult:
    """``result`` with factor ``which`` (``lora_A``, ``lora_B`` or Fed-SB's ``lora_R``) replaced by ``tensor``."""
    if which == Factor.LORA_A:
        return dataclasses.replace(result, A=tensor)
    if which == Factor.LORA_B:
        return dataclasses.replace(result, B=tensor)
    return dataclasses.replace(result, R=tensor)


def factor_of(factors: ModuleResult | PreviousFactors, which: Factor) -> Tensor | None:
    """Factor ``which`` of a module (None: a Fed-SB ``lora_R`` it does not hold)."""
    return {Factor.LORA_A: factors.A, Factor.LORA_B: factors.B, Factor.LORA_R: factors.R}[which]


def _factor_shape(result: ModuleResult, which: Factor) -> tuple[int, ...]:
    rank = int(result.A.shape[0])
    return {
        Factor.LORA_A: tuple(result.A.shape),
        Factor.LORA_B: tuple(result.B.shape),
        Factor.LORA_R: (rank, rank),
    }[which]


def step_tensor(
    new: Tensor, previous: Tensor | None, state: Mapping[str, Tensor] | None, cfg: ServerOptConfig
) -> tuple[Tensor, State]:
    """Step an extra tensor (a task head) elementwise: ``previous + U(new − previous)``.

    With no previous value (no earlier round published it: the server cannot know the clients'
    starting head) the average is taken as it is and the state starts at zero."""
    if previous is None:
        return new.to(torch.float32), {name: torch.zeros_like(new, dtype=_F64) for name in cfg.slots}
    if tuple(previous.shape) != tuple(new.shape):
        raise AggregationError(f"previous global has shape {tuple(previous.shape)}, the aggregate {tuple(new.shape)}")
    update, new_state = step(new.to(_F64) - previous.to(_F64), state, cfg)
    return (previous.to(_F64) + update).to(torch.float32), new_state


def state_shapes(
    cfg: ServerOptConfig,
    shape: tuple[int, ...],
    *,
    factors: tuple[int, int, int] | None = None,
    trained: tuple[Factor, ...] = (Factor.LORA_A, Factor.LORA_B),
) -> dict[str, tuple[int, ...]]:
    """The state slots an item keeps and their shapes: ``shape`` (product space or a tensor), or with
    ``factors=(rank, d_out, d_in)`` the factor-space slots of the ``trained`` factors (:func:`step_factors`:
    both; :func:`step_trained`: those the strategy trains)."""
    if factors is None:
        return {name: tuple(shape) for name in cfg.slots}
    rank, d_out, d_in = factors
    dims = {Factor.LORA_A: (rank, d_in), Factor.LORA_B: (d_out, rank), Factor.LORA_R: (rank, rank)}
    return {f"{factor}.{name}": dims[factor] for factor in sorted(trained) for name in cfg.slots}


def _fit_rows(t: Tensor, rank: int) -> Tensor:
    """``t``'s first ``rank`` rows, zero rows appended when it has fewer."""
    if t.shape[0] >= rank:
        return t[:rank]
    return torch.cat([t, t.new_zeros(rank - t.shape[0], *t.shape[1:])], 0)


def _sub_state(state: Mapping[str, Tensor] | None, name: str, rank: int, *, transposed: bool) -> State:
    """The slots of factor ``name`` brought to ``rank`` (a rank change pads or truncates them like the factors)."""
    out: State = {}
    for key, value in (state or {}).items():
        if key.startswith(name + "."):
            fitted = _fit_rows(value.mT, rank).mT if transposed else _fit_rows(value, rank)
            out[key.removeprefix(name + ".")] = fitted
    return out
