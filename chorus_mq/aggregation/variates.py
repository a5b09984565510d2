"""SCAFFOLD control variates on the trained LoRA tensors (Karimireddy et al. 2020, option II): pure math.

Per trained tensor (a module's A or B, or a task-head tensor): ``x`` the round's start (the previous
global adapter), ``y_i`` what client i trained from it, ``c`` the server variate the round started
with, ``lr_sum_i`` the learning rate summed over client i's local steps (K·η). Each local step moves
the tensor by ``-lr (c - c_i)`` on top of the optimizer's step, so option II's update is

    Δc_i = (x - y_i) / lr_sum_i - c            (the client keeps c_i + Δc_i)
    c'   = c + f Σ_i w_i κ_i Δc_i               (f = |S|/N, w the round's weights)

with ``κ_i`` the relative clip: no client's Δc_i counts for more than ``k`` times the lower median of
the round's norms (per item, over the clients that sent it). LoRA factors carry a gauge (``B G⁻¹, G A``
is the same product): the published adapter of the next round is rewritten in its own basis, so the
variate is carried into that basis by the rotation ``G = polar(A_new A_xᵀ)``: ``c_A -> G c_A`` and
``c_B -> c_B Gᵀ`` (see DESIGN.md section 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.robust import lower_median
from chorus_mq.errors import AggregationError

_F64 = torch.float64

#: the smallest ``lr_sum`` a client may declare: keeps ``(x - y) / lr_sum`` finite in float64 for any fp32 x, y
MIN_LR_SUM = 1e-12


def variate_delta(start: Tensor, trained: Tensor, server: Tensor | None, lr_sum: float) -> Tensor:
    """``Δc = (x - y) / lr_sum - c`` in float64 (``server`` None: a zero variate)."""
    if not (math.isfinite(lr_sum) and lr_sum >= MIN_LR_SUM):
        raise AggregationError(f"lr_sum must be finite and at least {MIN_LR_SUM:g}, got {lr_sum!r}")
    if start.shape != trained.shape:
        raise AggregationError(f"trained tensor has shape {tuple(trained.shape)}, its start {tuple(start.shape)}")
    delta = (start.to(_F64) - trained.to(_F64)) / lr_sum
    return delta if server is None else delta - server.to(_F64)


def clip_factors(norms: Sequence[float], k: float) -> list[float]:
    """Per client, the factor that brings its norm to at most ``k`` times the lower median (1.0 below it)."""
    if not norms:
        return []
    if not all(math.isfinite(n) and n >= 0 for n in norms):
        raise AggregationError(f"variate norms must be finite, got {list(norms)}")
    bound = k * lower_median(torch.tensor(norms, dtype=_F64))  # with two clients, the smaller sets the scale
    return [1.0 if n <= bound else bound / n for n in norms]


def item_norm(parts: Sequence[Tensor]) -> float:
    """The Frobenius norm of an item's tensors together (a module's ΔA and ΔB)."""
    return math.sqrt(sum(float(p.to(_F64).square().sum()) for p in parts))


def next_variate(
    server: Sequence[Tensor] | None,
    start: Sequence[Tensor],
    trained: Sequence[Sequence[Tensor]],
    lr_sums: Sequence[float],
    weights: Sequence[float],
    *,
    fraction: float,
    k: float,
) -> tuple[list[Tensor], list[float]]:
    """One item's next server variate (float64, the start's basis) and each client's clip factor.

    ``server`` and ``start`` hold the item's tensors (A, B for a module; one tensor for a head
    part); ``trained[i]`` client i's. Clients absent from the item are simply not listed: they
    add nothing.
    """
    if not len(trained) == len(lr_sums) == len(weights):
        raise AggregationError("one lr_sum and one weight per client")
    deltas = [
        [
            variate_delta(x, y, None if server is None else server[j], lr)
            for j, (x, y) in enumerate(zip(start, ys, strict=True))
        ]
        for ys, lr in zip(trained, lr_sums, strict=True)
    ]
    factors = clip_factors([item_norm(d) for d in deltas], k)
    total = [torch.zeros(x.shape, dtype=_F64) if server is None else server[j].to(_F64) for j, x in enumerate(start)]
    for d, w, kappa in zip(deltas, weights, factors, strict=True):
        if kappa == 0.0 or w == 0.0:
            continue
        for j, part in enumerate(d):
            total[j].add_(part, alpha=fraction * w * kappa)
    for t in total:
        if not bool(torch.isfinite(t).all()):
            raise AggregationError("the server variate is not finite")
    return total, factors


def gauge_rotation(a_new: Tensor, a_old: Tensor) -> Tensor:
    """The orthogonal ``G`` (r x r, float64) that takes ``a_old``'s rows closest to ``a_new``'s: the polar
    factor of ``a_new a_oldᵀ``. Identity when the two share their basis (G A = A for the same A)."""
    if a_new.shape != a_old.shape:
        raise AggregationError(
            f"the new adapter's A has shape {tuple(a_new.shape)}, the previous one {tuple(a_old.shape)}: "
            "SCAFFOLD needs one rank for the whole federation"
        )
    u, _, vh = torch.linalg.svd(a_new.to(_F64) @ a_old.to(_F64).mT)
    rotation: Tensor = u @ vh
    return rotation


def transport(a_part: Tensor, b_part: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor]:
    """A module's variate carried into the basis ``G A``: ``(G c_A, c_B Gᵀ)`` (float64)."""
    g = rotation.to(_F64)
    return g @ a_part.to(_F64), b_part.to(_F64) @ g.mT


def client_variate(own: Tensor | None, server: Tensor | None, start: Tensor, trained: Tensor, lr_sum: float) -> Tensor:
    """A client's next variate ``c_i + Δc_i = c_i - c + (x - y_i) / lr_sum`` (float64; None: zero)."""
    out = variate_delta(start, trained, server, lr_sum)
    return out if own is None else out + own.to(_F64)
