"""Inputs and outputs of the engine, their validation, and the weighted mean of extra tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from chorus_mq.factors import Residual
from chorus_mq.errors import AggregationError


@dataclass(frozen=True)
class ClientUpdate:
    """One client's LoRA factors for one module, PEFT layout (``dW = scaling * B @ A``)."""

    A: Tensor  # (r_i, d_in), any float dtype
    B: Tensor  # (d_out, r_i)
    scaling: float  # lora_alpha / r_i, or lora_alpha / sqrt(r_i) with rsLoRA
    weight: float = 1.0  # >= 0; normalised over the updates of one call


@dataclass
class ModuleResult:
    """The global adapter of one module and what it leaves out.

    Exact: ``scaling * B.float() @ A.float() + residual == sum_i w_i s_i B_i A_i``.
    """

    A: Tensor  # (r_out, d_in), out_dtype
    B: Tensor  # (d_out, r_out), out_dtype
    scaling: float
    residual: Residual | None  # None means exactly zero


@dataclass(frozen=True)
class Prepared:
    """Validated updates with zero-weight clients removed and weights normalised."""

    updates: tuple[ClientUpdate, ...]
    weights: tuple[float, ...]
    d_out: int
    d_in: int

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(u.A.shape[0] for u in self.updates)

    @property
    def out_scaling(self) -> float:
        """The scaling of the first client of maximal rank (the paper's rule when all agree)."""
        ranks = self.ranks
        return float(self.updates[ranks.index(max(ranks))].scaling)

    @property
    def products(self) -> tuple[float, ...]:
        """``w_i * s_i``, the weight of ``B_i @ A_i`` in the ideal update."""
        return tuple(w * float(u.scaling) for u, w in zip(self.updates, self.weights))


def normalize_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Weights divided by their sum; errors for negative, non-finite or all-zero weights."""
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise AggregationError(f"weights must be numbers: {exc}") from None
    if len(weights) != count:
        raise AggregationError(f"got {len(weights)} weights for {count} inputs")
    if count == 0:
        raise AggregationError("nothing to aggregate: the list of inputs is empty")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"weight #{i} is {w}; weights must be finite and >= 0")
    total = math.fsum(weights)
    if total <= 0:
        raise AggregationError("all weights are zero; at least one input must count")
    return tuple(w / total for w in weights)


def prepare(updates: Sequence[ClientUpdate]) -> Prepared:
    """Check shapes, dtypes and scalings; drop clients whose weight or scaling is zero."""
    updates = list(updates)
    if not updates:
        raise AggregationError("nothing to aggregate: the list of updates is empty")
    dims = [_check_factors(i, u) for i, u in enumerate(updates)]
    for i, d in enumerate(dims):
        if d != dims[0]:
            raise AggregationError(
                f"client #{i} updates a ({d[0]} x {d[1]}) module, client #0 a ({dims[0][0]} x {dims[0][1]})"
                " one; all must target the same module"
            )
    weights = normalize_weights([u.weight for u in updates], len(updates))
    # float scalings from here on, whatever real type (numpy, 0-d tensor) the caller used
    kept = [(replace(u, scaling=float(u.scaling)), w) for u, w in zip(updates, weights)]
    kept = [(u, w) for u, w in kept if w > 0 and u.scaling != 0]
    if not kept:
        raise AggregationError("every client with a nonzero weight has a zero scaling; nothing to aggregate")
    kept_updates, kept_weights = zip(*kept)
    return Prepared(kept_updates, normalize_weights(kept_weights, len(kept_weights)), *dims[0])


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted mean accumulated in float64 in the given order, returned in ``tensors[0]``'s dtype.

    For tensors aggregated whole, such as ``modules_to_save`` heads.
    """
    weights = normalize_weights(weights, len(tensors))
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise AggregationError(f"tensor #{i} has dtype {t.dtype}; only float tensors can be averaged")
        if t.shape != first.shape:
            raise AggregationError(f"tensor #{i} has shape {tuple(t.shape)}, tensor #0 {tuple(first.shape)}")
    acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for t, w in zip(tensors, weights):
        if w > 0:
            acc.add_(t.to(torch.float64), alpha=w)
    return acc.to(first.dtype)


def _check_factors(i: int, u: ClientUpdate) -> tuple[int, int]:
    if not isinstance(u, ClientUpdate):
        raise AggregationError(f"input #{i} is a {type(u).__name__}, not a ClientUpdate")
    a, b = u.A, u.B
    if a.ndim != 2 or b.ndim != 2:
        raise AggregationError(f"client #{i}: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AggregationError(f"client #{i}: factors must be floating point, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise AggregationError(
            f"client #{i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not share a rank >= 1"
            " (A is (r, d_in), B is (d_out, r))"
        )
    try:
        scaling = float(u.scaling)
    except (TypeError, ValueError):
        scaling = math.nan
    if not math.isfinite(scaling) or scaling < 0:
        raise AggregationError(f"client #{i}: scaling is {u.scaling!r}; it must be a finite number >= 0")
    return b.shape[0], a.shape[1]
