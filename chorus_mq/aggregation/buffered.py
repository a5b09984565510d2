"""Buffered (FedBuff) flushes, exact per flush: staleness weights and the published correction.

Pure math on tensors (DESIGN.md section 1, "Buffered flushes"). Version ``v``'s model of a module is
``W_v + s_v B_v A_v`` with ``W_v`` the base plus every residual up to ``v``; a client that trained
from version ``b`` uploads ``(B'_i, A'_i, s_i)``, so its update is ``Δ_i = s_i B'_i A'_i − s_b B_b A_b``.
A flush moves version ``v`` to ``v + 1 = v + η Σ_i p_i Δ_i`` with ``p_i = w_i g(τ_i) / Σ_j w_j g(τ_j)``.
The adapter of ``v + 1`` is the strategy's exact aggregate ``M = s B A + R`` of the uploaded factors
under the weights ``p``; the residual is what makes the model exact::

    R_{v+1} = η R + (η − 1) s B A + s_v B_v A_v − η Σ_b P_b s_b B_b A_b,   P_b = Σ_{i: b_i = b} p_i

every term low-rank, so it is published as one factored product (dense where that is smaller). The
current version's adapter and a base's are the same when ``b = v``: one term, coefficient ``1 − η P_v``
(all fresh at ``η = 1``: zero, and the residual is the strategy's own).

A linear strategy (a frozen shared frame: ffa-lora's A, fed-sb's B and A) needs no residual: every version
has the same frozen factor, so a delta's update is the change of the trained factor ``X`` (B, or fed-sb's R)
relative to its base, ``Δ_i = s (X_i − X_b) F``, and the same coefficients move the trained factor itself::

    X_{v+1} = η X + Σ_b ([b = v] − η P_b) (s_b / s) X_b,   X = Σ_i p_i (s_i / s) X_i (the strategy's average)

so ``s X_{v+1} F = s_v X_v F + η Σ_i p_i Δ_i`` exactly (:func:`flush_trained`).

Server-side DP per flush (``aggregation.dp``'s Gaussian mechanism): ``v + 1 = v + η (Σ_i q_i c_i Δ_i + Z)``
with each delta's update clipped adapter-wide to ``C`` (``c_i``, from :func:`delta_norm_sq`), fixed public
weights ``q_i = g(τ_i) / (K k_i)`` (:func:`dp_flush_weights`; ``k_i`` the deltas its client has in the flush,
``g ≤ 1``) that are not renormalised, so one client's whole contribution has norm at most ``C / K``, and
``Z ~ N(0, (z C / K)^2)`` dense per module: the same mechanism, sensitivity and noise as a synchronous round
of quorum K. The same correction then applies with ``P_b = Σ_{i: b_i = b} q_i c_i`` unnormalised. A linear
strategy clips and noises its trained factor's step alone, with the same weights and σ (``aggregation.dp_linear``).

Norm bounds outside DP (``--clip-norm``, ``--relative-clip``): ``v + 1 = v + η Σ_i p_i c_i Δ_i``, each ``c_i`` the
synchronous round's factor taken on the delta's update against its own base version (:func:`delta_clip_factors`,
per module and adapter-wide). The strategy renormalises its weights over a module's holders, which would cancel
a common ``c_i``: so each holder weighs ``p_i c_i`` and the clipped-away ``p_i (1 − c_i)`` joins the absent mass
(an update of zero), leaving the total as it was (:func:`clip_into_absent`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.server_opt import PreviousFactors
from chorus_mq.aggregation.updates import ModuleResult
from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual, dense_is_smaller
from chorus_mq.names import Factor
from chorus_mq.staleness import StalenessRule

_F64 = torch.float64

__all__ = [
    "StalenessRule",
    "base_masses",
    "clip_into_absent",
    "delta_clip_factors",
    "delta_norm_sq",
    "dp_flush_weights",
    "flush_module",
    "flush_residual_form",
    "flush_trained",
    "flush_weights",
    "version_coefficients",
]


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


def dp_flush_weights(
    staleness: Sequence[int], terms_of_client: Sequence[int], rule: StalenessRule, quorum: int
) -> tuple[float, ...]:
    """A DP flush's fixed public weights ``q_i = g(τ_i) / (K k_i)`` (``terms_of_client``: ``k_i``, how many deltas
    delta i's client has in the flush). Not renormalised: a client's deltas weigh at most ``1 / K`` together."""
    if len(staleness) != len(terms_of_client) or not staleness:
        raise AggregationError(f"{len(staleness)} staleness values for {len(terms_of_client)} counts; need one each")
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 1:
        raise AggregationError(f"quorum must be an int >= 1, got {quorum!r}")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in terms_of_client):
        raise AggregationError(f"term counts must be ints >= 1, got {list(terms_of_client)!r}")
    return tuple(rule.g(t) / (quorum * k) for t, k in zip(staleness, terms_of_client, strict=True))


def delta_norm_sq(update: PreviousFactors, base: PreviousFactors | None) -> float:
    """``||s B A − s_b B_b A_b||_F^2`` of one module (Fed-SB: with R), in float64 through r x r products
    only: ``||P||^2 + ||Q||^2 − 2 <P, Q>`` with ``<s B A, s_b B_b A_b> = s s_b Σ (Bᵀ B_b) ⊙ (A A_bᵀ)``."""

    def left(f: PreviousFactors) -> Tensor:
        return f.B.to(_F64) if f.R is None else f.B.to(_F64) @ f.R.to(_F64)

    def gram(x: PreviousFactors, y: PreviousFactors) -> float:
        inner = (left(x).T @ left(y)) * (x.A.to(_F64) @ y.A.to(_F64).T)  # both (r_x, r_y)
        return float(inner.sum()) * float(x.scaling) * float(y.scaling)

    total = gram(update, update)
    if base is not None:
        if base.A.shape[1] != update.A.shape[1] or base.B.shape[0] != update.B.shape[0]:
            raise AggregationError(
                f"a delta of {update.B.shape[0]} x {update.A.shape[1]} against a base version's "
                f"{base.B.shape[0]} x {base.A.shape[1]}"
            )
        total += gram(base, base) - 2.0 * gram(update, base)
    return max(total, 0.0)  # rounding can take a zero difference a hair below 0


def delta_clip_factors(module_norms: Tensor, clip_norm: float, relative: float) -> Tensor:
    """(M, N) clip factors of N deltas' updates against their own base versions, ``module_norms[m, i]`` delta
    i's ``||Δ_im||_F`` (NaN where it did not send module m): ``min(1, C / ||Δ_i||)`` adapter-wide (``clip_norm``
    C, 0 = off) times the synchronous round's relative factors (``relative`` k, 0 = off;
    ``robust.relative_clip_factors``)."""
    norms = module_norms.to(_F64)
    if norms.dim() != 2:
        raise AggregationError(f"module norms must be (modules, deltas), got shape {tuple(norms.shape)}")
    if not math.isfinite(clip_norm) or clip_norm < 0:
        raise AggregationError(f"the clip norm must be finite and >= 0, got {clip_norm!r}")
    factors = torch.ones_like(norms)
    if clip_norm:
        whole = torch.where(torch.isnan(norms), torch.zeros_like(norms), norms).square().sum(0).sqrt()
        cap = torch.where(whole > clip_norm, clip_norm / whole, torch.ones_like(whole))
        factors = factors * cap[None, :]
    if relative:
        from .robust import relative_clip_factors

        factors = factors * relative_clip_factors(norms, relative)
    return factors


def clip_into_absent(weights: Sequence[float], factors: Sequence[float], absent: float) -> tuple[list[float], float]:
    """A module's holders' weights ``p_i c_i`` and the absent mass plus the clipped-away ``Σ p_i (1 − c_i)``: the
    strategy's renormalisation over holders and absent mass then keeps every ``c_i`` (the total is unchanged)."""
    if len(weights) != len(factors):
        raise AggregationError(f"{len(weights)} weights for {len(factors)} clip factors; need one each")
    if any(not (0.0 <= float(c) <= 1.0) for c in factors):
        raise AggregationError(f"clip factors must lie in [0, 1], got {list(factors)!r}")
    out = [float(w) * float(c) for w, c in zip(weights, factors, strict=True)]
    away = math.fsum(float(w) * (1.0 - float(c)) for w, c in zip(weights, factors, strict=True))
    return out, float(absent) + away


def base_masses(bases: Sequence[int], weights: Sequence[float]) -> dict[int, float]:
    """``P_b = Σ_{i: b_i = b} p_i`` by base version (the share of the flush that started from ``b``)."""
    out: dict[int, float] = {}
    for b, p in zip(bases, weights, strict=True):
        out[b] = out.get(b, 0.0) + float(p)
    return dict(sorted(out.items()))


def version_coefficients(current: int, masses: Mapping[int, float], lr: float) -> dict[int, float]:
    """Each version's coefficient in the published residual: ``[b = v] − η P_b`` (``v`` = ``current``)."""
    out = {b: -float(lr) * float(m) for b, m in masses.items()}
    out[current] = out.get(current, 0.0) + 1.0
    return dict(sorted(out.items()))


Terms = Sequence[tuple[PreviousFactors, float]]


def flush_residual_form(
    shape: tuple[int, int], strategy_form: str, strategy_k: int, adapter_rank: int, lr: float, terms: Terms
) -> tuple[str, int]:
    """The residual :func:`flush_module` publishes, from metadata: ``(form, k)``, ``k`` the factored rank
    (0 unless factored). ``strategy_form`` / ``strategy_k``: the strategy's own residual layout."""
    if strategy_form == "dense":
        return "dense", 0
    k = strategy_k if strategy_form == "factored" else 0
    k += adapter_rank if float(lr) != 1.0 else 0
    k += sum(int(f.A.shape[0]) for f, coeff in terms if coeff != 0.0)
    if k == 0:
        return "none", 0
    if dense_is_smaller(shape[0], shape[1], k):
        return "dense", 0
    return "factored", k


def flush_module(result: ModuleResult, terms: Terms, lr: float = 1.0) -> ModuleResult:
    """Version ``v + 1`` of one module: ``result`` is the strategy's exact aggregate of the flush's uploads
    under the flush weights ``p`` (absent mass included); ``terms`` each version's adapter with its
    coefficient from :func:`version_coefficients` (a version without an adapter: leave it out, a zero
    product). The adapter stays ``result``'s; the residual is that of the module docstring (in the form
    :func:`flush_residual_form` names), so adapter + residual is ``s_v B_v A_v + η Σ p_i Δ_i``."""
    _check_lr(lr)
    d_out, d_in = int(result.B.shape[0]), int(result.A.shape[1])
    lefts: list[Tensor] = []
    rights: list[Tensor] = []

    def add(b: Tensor, a: Tensor, coeff: float) -> None:
        if coeff == 0.0:
            return
        if (int(b.shape[0]), int(a.shape[1])) != (d_out, d_in):
            raise AggregationError(f"a version's adapter is {b.shape[0]} x {a.shape[1]}, the flush {d_out} x {d_in}")
        lefts.append(b.to(_F64) * coeff)
        rights.append(a.to(_F64))

    res = result.residual
    strategy_form, strategy_k = "none", 0
    if res is not None and res.dense is None:
        assert res.left is not None and res.right is not None
        strategy_form, strategy_k = "factored", int(res.left.shape[1])
        add(res.left, res.right, float(lr))
    elif res is not None:
        strategy_form = "dense"
    add(result.B, result.A, (float(lr) - 1.0) * float(result.scaling))
    for factors, coeff in terms:
        add(factors.B, factors.A, float(coeff) * float(factors.scaling))
    form, _ = flush_residual_form((d_out, d_in), strategy_form, strategy_k, int(result.A.shape[0]), lr, terms)
    if form == "none":
        return ModuleResult(result.A, result.B, result.scaling, None)
    if form == "dense":
        dense = torch.zeros(d_out, d_in, dtype=_F64)
        if res is not None and res.dense is not None:
            dense += res.dense.to(_F64) * float(lr)
        for left, right in zip(lefts, rights, strict=True):
            dense.addmm_(left, right)
        return ModuleResult(result.A, result.B, result.scaling, Residual(dense=dense))
    residual = Residual(left=torch.cat(lefts, 1), right=torch.cat(rights, 0))
    return ModuleResult(result.A, result.B, result.scaling, residual)


def flush_trained(result: ModuleResult, terms: Terms, lr: float, trains: Factor) -> ModuleResult:
    """Version ``v + 1`` of one module of a linear strategy: ``result`` is its average of the flush's uploads
    under the flush weights ``p`` (absent mass included), ``terms`` each version's adapter with its coefficient
    from :func:`version_coefficients`; ``trains`` the factor the clients trained (``lora_B``, ``lora_A`` or
    ``lora_R``). The trained factor moves as the module docstring says, the frozen ones stay ``result``'s
    (every version's must be the same, value for value), and there is no residual. One rounding, at the cast."""
    _check_lr(lr)
    trains = Factor(trains)
    s_out = float(result.scaling)
    acc = _trained(result, trains).to(_F64) * float(lr)
    for factors, coeff in terms:
        if coeff == 0.0:
            continue
        for name, mine, shared in _frozen_pairs(factors, result, trains):
            if mine.shape != shared.shape or not torch.equal(mine.to(_F64), shared.to(_F64)):
                raise AggregationError(
                    f"a base version's {name} differs from the flush's: a buffered flush moves only the trained "
                    f"factor ({trains}), so every version must share the frozen one"
                )
        theirs = _trained(factors, trains)
        if theirs.shape != acc.shape:
            raise AggregationError(
                f"a base version's {trains} is {tuple(theirs.shape)}, the flush's {tuple(acc.shape)}"
            )
        acc.add_(theirs.to(_F64), alpha=float(coeff) * float(factors.scaling) / s_out)
    out = acc.to(_trained(result, trains).dtype)
    if trains == Factor.LORA_R:
        return ModuleResult(result.A, result.B, result.scaling, None, R=out)
    if trains == Factor.LORA_B:
        return ModuleResult(result.A, out, result.scaling, None)
    return ModuleResult(out, result.B, result.scaling, None)


def _trained(m: ModuleResult | PreviousFactors, trains: Factor) -> Tensor:
    t = m.R if trains == Factor.LORA_R else m.B if trains == Factor.LORA_B else m.A
    if t is None:
        raise AggregationError("a fed-sb version has no lora_R to move")
    return t


def _frozen_pairs(
    factors: PreviousFactors, result: ModuleResult, trains: Factor
) -> tuple[tuple[str, Tensor, Tensor], ...]:
    """(name, a version's frozen factor, the flush's) for each factor the clients did not train."""
    a, b = ("lora_A", factors.A, result.A), ("lora_B", factors.B, result.B)
    return {Factor.LORA_R: (a, b), Factor.LORA_B: (a,), Factor.LORA_A: (b,)}[trains]


def _check_lr(lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise AggregationError(f"the server learning rate must be a finite number > 0, got {lr!r}")
