"""Buffered (FedBuff) flushes, exact per flush: staleness weights and the published correction.

Pure math on tensors (DESIGN.md section 1, "Buffered flushes"). Version ``v``'s model of a module is
``W_v + s_v B_v A_v`` with ``W_v`` the base plus every residual up to ``v``; a client that trained
from version ``b`` uploads ``(B'_i, A'_i, s_i)``, so its update is ``Δ_i = s_i B'_i A'_i − s_b B_b A_b``.
A flush moves version ``v`` to ``v + 1 = v + η Σ_i p_i Δ_i`` with ``p_i = w_i g(τ_i) / Σ_j w_j g(τ_j)``.
The adapter of ``v + 1`` is the strategy's exact aggregate ``M = s B A + R`` of the uploaded factors
under the weights ``p``; the residual is what makes the model exact::

    R_{v+1} = η R + (η − 1) s B A + s_v B_v A_v − η Σ_b P_b s_b B_b A_b,   P_b = Σ_{i: b_i = b} p_i

every term low-rank, so it is published as one factored product (dense where that is smaller).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.server_opt import PreviousFactors
from chorus_mq.aggregation.updates import ModuleResult
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.factors import Residual, dense_is_smaller
from chorus_mq.names import BUFFERED_STRATEGIES, Strategy
from chorus_mq.staleness import StalenessRule

_F64 = torch.float64

__all__ = ["BUFFERED_STRATEGIES", "StalenessRule", "base_masses", "check_buffered", "flush_module", "flush_weights"]


def flush_weights(weights: Sequence[float], staleness: Sequence[int], rule: StalenessRule) -> tuple[float, ...]:
    """``p_i = w_i g(τ_i) / Σ_j w_j g(τ_j)``; AggregationError for bad weights or nothing that counts."""
    if len(weights) != len(staleness) or not weights:
        raise AggregationError(f"{len(weights)} weights for {len(staleness)} staleness values; need one each, >= 1")
    for w in weights:
        if isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise AggregationError(f"weight {w!r}: weights must be finite and >= 0")
    raw = [float(w) * rule.g(t) for w, t in zip(weights, staleness, strict=True)]
    total = math.fsum(raw)
    if total <= 0:
        raise AggregationError("every weight of the flush is zero; at least one delta must count")
    return tuple(x / total for x in raw)


def base_masses(bases: Sequence[int], weights: Sequence[float]) -> dict[int, float]:
    """``P_b = Σ_{i: b_i = b} p_i`` by base version (the share of the flush that started from ``b``)."""
    out: dict[int, float] = {}
    for b, p in zip(bases, weights, strict=True):
        out[b] = out.get(b, 0.0) + float(p)
    return dict(sorted(out.items()))


def flush_module(
    result: ModuleResult,
    current: PreviousFactors | None,
    bases: Mapping[int, tuple[PreviousFactors | None, float]],
    lr: float = 1.0,
) -> ModuleResult:
    """Version ``v + 1`` of one module: ``result`` is the strategy's exact aggregate of the flush's uploads
    under the flush weights ``p`` (absent mass included), ``current`` version ``v``'s adapter, ``bases``
    each base version's adapter and mass ``P_b`` (None: that version had none, a zero product). The adapter
    stays ``result``'s; the residual is that of the module docstring, so adapter + residual is
    ``s_v B_v A_v + η Σ p_i Δ_i`` (the model's move from ``W_v``)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise AggregationError(f"the server learning rate must be a finite number > 0, got {lr!r}")
    d_out, d_in = int(result.B.shape[0]), int(result.A.shape[1])
    lefts: list[Tensor] = []
    rights: list[Tensor] = []

    def add(b: Tensor, a: Tensor, coeff: float) -> None:
        if coeff == 0.0 or b.shape[1] == 0:
            return
        if tuple(b.shape[:1]) + tuple(a.shape[1:]) != (d_out, d_in):
            raise AggregationError(f"a version's adapter is {b.shape[0]} x {a.shape[1]}, the flush {d_out} x {d_in}")
        lefts.append(b.to(_F64) * coeff)
        rights.append(a.to(_F64))

    res = result.residual
    if res is not None and res.dense is None:
        assert res.left is not None and res.right is not None
        add(res.left, res.right, float(lr))
    add(result.B, result.A, (float(lr) - 1.0) * float(result.scaling))
    if current is not None:
        add(current.B, current.A, float(current.scaling))
    for factors, mass in bases.values():
        if factors is not None:
            add(factors.B, factors.A, -float(lr) * float(mass) * float(factors.scaling))
    k = sum(int(t.shape[1]) for t in lefts)
    if (res is not None and res.dense is not None) or dense_is_smaller(d_out, d_in, k):
        dense = torch.zeros(d_out, d_in, dtype=_F64)
        if res is not None and res.dense is not None:
            dense += res.dense.to(_F64) * float(lr)
        for left, right in zip(lefts, rights, strict=True):
            dense.addmm_(left, right)
        return ModuleResult(result.A, result.B, result.scaling, Residual(dense=dense))
    if k == 0:
        return ModuleResult(result.A, result.B, result.scaling, None)
    return ModuleResult(
        result.A, result.B, result.scaling, Residual(left=torch.cat(lefts, 1), right=torch.cat(rights, 0))
    )


def check_buffered(strategy: Strategy | str) -> None:
    """ConfigError for a strategy a buffered flush is not exact for (fedavg has no residual to absorb the
    bases' products; stack's clients train from an approximation of the published model)."""
    if Strategy(strategy) not in BUFFERED_STRATEGIES:
        allowed = ", ".join(sorted(s.value for s in BUFFERED_STRATEGIES))
        raise ConfigError(
            f"buffered mode is exact per flush only for {allowed}; strategy {Strategy(strategy).value} is not supported"
        )
