"""Aggregation strategies for one module: fedavg, fedex-lora, svd, stack, and the linear ffa-lora and rolora.

All but fedavg are exact: ``scaling * B @ A + residual == sum_i w_i s_i B_i A_i`` with
``w`` normalised over the updates' weights plus the absent weight. Inputs of any float
dtype are used at their exact values (upcast); order and dtypes are fixed, so the same
inputs give bit-identical outputs. The shapes are those :func:`output_layout` predicts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chorus_mq.aggregation.canonical import canonical_updates
from chorus_mq.aggregation.lowrank import split_svd
from chorus_mq.aggregation.shapes import OutputLayout, as_strategy, holders, output_layout
from chorus_mq.aggregation.updates import (
    NOT_FINITE,
    ClientMeta,
    ClientUpdate,
    ModuleResult,
    check_finite,
    module_dims,
    pad_rank,
)
from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual
from chorus_mq.names import Factor, Strategy
from chorus_mq.strategy import Rule, strategy_spec

_F32 = torch.float32
_F64 = torch.float64
_EPS32 = torch.finfo(_F32).eps


@dataclass(frozen=True)
class Prepared:
    """The updates that count (weight > 0, scaling != 0), their normalised weights and the layout to fill."""

    updates: tuple[ClientUpdate, ...]
    weights: tuple[float, ...]
    whole: bool  # no weight is absent: the weights sum to 1
    layout: OutputLayout
    #: the factor the clients trained (linear strategies; the other is frozen and shared); None: both
    trains: Factor | None = None

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(u.A.shape[0]) for u in self.updates)

    @property
    def scalings(self) -> tuple[float, ...]:
        return tuple(float(u.scaling) for u in self.updates)

    @property
    def products(self) -> tuple[float, ...]:
        """``w_i * s_i``, the weight of ``B_i @ A_i`` in the ideal update."""
        return tuple(w * s for w, s in zip(self.weights, self.scalings, strict=True))

    @property
    def fine(self) -> bool:
        """The adapter dtype is float32 or finer (its rounding is below the residual's)."""
        return torch.finfo(self.layout.dtype).eps <= _EPS32


def prepare(
    updates: Sequence[ClientUpdate],
    strategy: Strategy | str = Strategy.FEDEX_LORA,
    *,
    absent_weight: float = 0.0,
    out_rank: int | None = None,
    out_dtype: torch.dtype = _F32,
) -> Prepared:
    """Check the updates and options and fix the output layout; drops clients that do not count."""
    d_out, d_in = module_dims(updates)
    metas = [ClientMeta.of(u) for u in updates]
    layout = output_layout(
        strategy, metas, d_out, d_in, absent_weight=absent_weight, out_rank=out_rank, out_dtype=out_dtype
    )
    who = holders(metas, absent_weight)
    kept = tuple(updates[i] for i in who.index)
    return Prepared(kept, who.weights, who.whole, layout)


def aggregate_module(
    updates: Sequence[ClientUpdate],
    strategy: Strategy | str = Strategy.FEDEX_LORA,
    *,
    absent_weight: float = 0.0,
    out_rank: int | None = None,
    out_dtype: torch.dtype = _F32,
    trains: Factor | str | None = None,
) -> ModuleResult:
    """Aggregate one module's client updates into a global adapter and its residual.

    * ``fedavg``: weighted means of the clients' canonical A and B (B rescaled to the output
      scaling); inexact by design, no residual. A baseline, never the default.
    * ``fedex-lora``: the same factors plus the exact residual at its exact rank.
    * ``svd``: the best rank-``out_rank`` approximation (default: the largest client
      rank), scaling 1.0, and the discarded directions as the residual.
    * ``stack``: all client factors side by side (rank ``sum r_i``), scaling 1.0.
    * ``ffa-lora``, ``rolora``: the factor named by ``trains`` (the round's trainable factor) is
      averaged, ``sum w_i (s_i / s) X_i``; the other must be bit-identical across the clients and is
      published as it is. Exact with no residual: ``s B (sum ...) = sum w_i s_i B A_i`` and likewise for B.
    * ``fed-sb``: B and A must be bit-identical across the clients (the frozen frame); each update's
      ``R`` is averaged, ``R = sum w_i (s_i / s) R_i``, so ``s B R A = sum w_i s_i B R_i A`` exactly.

    Factors are first rewritten in a canonical form that depends on each client's product
    only (:mod:`chorus_mq.aggregation.canonical`), so no factorisation a client picks can
    inflate the cross terms of an average or reach the published adapter; see
    :func:`_canonicalises` for when.

    ``absent_weight`` is the weight of the round's clients that did not send this module:
    each counts as a zero update. ``out_rank`` larger than a strategy's natural rank
    zero-pads; only svd truncates. When ``out_dtype`` is coarser than float32 the residual
    also absorbs the adapter's rounding. The shapes are ``output_layout``'s for the same
    inputs; a non-finite result raises AggregationError.
    """
    rule = as_strategy(strategy)
    spec = strategy_spec(rule)
    p = prepare(updates, rule, absent_weight=absent_weight, out_rank=out_rank, out_dtype=out_dtype)
    if spec.sandwich:
        p = dataclasses.replace(p, trains=Factor.LORA_R)
    elif spec.frozen_shared:
        if trains is None:
            raise AggregationError(f"{rule} needs the round's trainable factor (trains=lora_A or lora_B)")
        p = dataclasses.replace(p, trains=Factor(trains))
    if _canonicalises(rule, p):
        p = dataclasses.replace(p, updates=canonical_updates(p.updates, p.products))
    result = _RULES[spec.rule](p)
    return check_finite(_conform(result, p.layout))


def _canonicalises(rule: Strategy, p: Prepared) -> bool:
    """Whether the rule rounds or averages the clients' factors themselves, so it needs them canonical.

    fedavg and fedex-lora average factors, and publish a lone client's (so it cannot hand the
    next round a start of B c, A / c either), except where the layout promised a bf16/fp16
    adapter with no residual because that client's own factors survive the cast; stack and a
    low-precision svd round scaled client factors. A fine svd works on the products in float64.
    """
    spec = strategy_spec(rule)
    if not spec.canonicalises:  # a frozen shared factor must reach the average as it is
        return False
    if spec.rule in ("fedavg", "fedex"):
        return len(p.updates) > 1 or p.fine or p.layout.residual != "none"
    return spec.rule == "stack" or not p.fine


def _fedavg(p: Prepared) -> ModuleResult:
    a_mean, b_mean, s_out = _means(p)
    return ModuleResult(_cast(a_mean, p.layout.dtype), _cast(b_mean, p.layout.dtype), s_out, None)


def _fedex(p: Prepared) -> ModuleResult:
    a_mean, b_mean, s_out = _means(p)
    a_out, b_out = _cast(a_mean, p.layout.dtype), _cast(b_mean, p.layout.dtype)
    if p.layout.residual == "none":
        return ModuleResult(a_out, b_out, s_out, None)
    if p.fine:
        return ModuleResult(a_out, b_out, s_out, _fedex_residual(p, a_mean, dense=p.layout.residual == "dense"))
    # R = [sqrt(w_i s_i) B_i ... | -s B'] @ [sqrt(w_i s_i) A_i ... ; A'] from the *cast* factors,
    # so the residual also absorbs the rounding of a low-precision adapter.
    r_max = max(p.ranks)
    roots = [math.sqrt(ws) for ws in p.products]
    left, right = _concat(p, roots, extra=(b_out[:, :r_max], a_out[:r_max], -s_out))
    return ModuleResult(a_out, b_out, s_out, _residual(left, right, p.layout))


def _shared(p: Prepared) -> ModuleResult:
    """One factor frozen and shared: the weighted average of the trained one, the frozen one as it is."""
    first = p.updates[0]
    train_b = p.trains == Factor.LORA_B
    frozen = first.A if train_b else first.B
    frozen64 = frozen.to(_F64)
    for i, u in enumerate(p.updates):
        other = u.A if train_b else u.B
        if other is frozen:  # the very tensor (a shard hands every holder the published one)
            continue
        # value identity (exact in float64): any dtype that holds the same numbers shares the factor
        if other.shape != frozen.shape or not torch.equal(other.to(_F64), frozen64):
            name = "lora_A" if train_b else "lora_B"
            raise AggregationError(
                f"client #{i}: its {name} differs from the other clients'; this round freezes {name} and "
                f"averages {p.trains} only"
            )
    s_out = p.scalings[0]
    trained = [u.B if train_b else u.A for u in p.updates]
    acc = torch.zeros(trained[0].shape, dtype=_F64, device=trained[0].device)
    for t, w, s in zip(trained, p.weights, p.scalings, strict=True):
        acc.add_(t, alpha=w * s / s_out)  # float64 accumulator: one rounding, at the cast
    out, kept = _cast(acc, p.layout.dtype), _cast(frozen, p.layout.dtype)
    if train_b:
        return ModuleResult(kept, out, s_out, None)
    return ModuleResult(out, kept, s_out, None)


def _sandwich(p: Prepared) -> ModuleResult:
    """Fed-SB: B and A frozen and shared, the weighted average of the clients' R in float64."""
    first = p.updates[0]
    for i, u in enumerate(p.updates):
        if u.R is None:
            raise AggregationError(f"client #{i}: fed-sb averages lora_R and this update has none")
        for name, mine, shared in (("lora_A", u.A, first.A), ("lora_B", u.B, first.B)):
            if mine.shape != shared.shape or not torch.equal(mine.to(_F64), shared.to(_F64)):
                raise AggregationError(
                    f"client #{i}: its {name} differs from the other clients'; fed-sb freezes lora_A and "
                    "lora_B and averages lora_R only"
                )
    s_out = p.scalings[0]
    acc = torch.zeros(first.A.shape[0], first.A.shape[0], dtype=_F64, device=first.A.device)
    for u, w, s in zip(p.updates, p.weights, p.scalings, strict=True):
        assert u.R is not None  # checked above
        acc.add_(u.R.to(_F64), alpha=w * s / s_out)  # float64 accumulator: one rounding, at the cast
    dtype = p.layout.dtype
    return ModuleResult(_cast(first.A, dtype), _cast(first.B, dtype), s_out, None, R=_cast(acc, dtype))


def _means(p: Prepared) -> tuple[Tensor, Tensor, float]:
    """FedAvg factors ``A = sum w_i A_i``, ``B = sum w_i (s_i / s) B_i`` in float64, and ``s``."""
    s_out = p.scalings[p.ranks.index(max(p.ranks))]  # the first client of maximal rank (the paper's rule)
    rank, (d_out, d_in) = p.layout.rank, (p.layout.d_out, p.layout.d_in)
    device = p.updates[0].A.device
    a_mean = torch.zeros(rank, d_in, dtype=_F64, device=device)
    b_mean = torch.zeros(d_out, rank, dtype=_F64, device=device)
    for u, w, s in zip(p.updates, p.weights, p.scalings, strict=True):
        r = u.A.shape[0]
        # in-place adds promote to the float64 accumulator: no upcast copy of the inputs
        a_mean[:r].add_(u.A, alpha=w)
        b_mean[:, :r].add_(u.B, alpha=w * s / s_out)
    return a_mean, b_mean, s_out


def _fedex_residual(p: Prepared, a_mean: Tensor, *, dense: bool) -> Residual:
    """``sum_i w_i s_i B_i (A_i - A_mean)``, with one client eliminated when the weights sum to 1.

    Then ``w_j (A_j - A_mean) = -sum_{i != j} w_i (A_i - A_mean)`` and the residual is
    ``sum_{i != j} w_i (s_i B_i - s_j B_j)(A_i - A_mean)`` (padded to each term's rank): with
    ``j`` of least rank (the heaviest of those) that is ``K - r_j`` columns, the residual's exact
    rank for clients in general position. Each block is formed in float64 and rounded once.
    """
    ranks = p.ranks
    # Of the least-rank clients, eliminate the heaviest: its B enters every other term times
    # that term's weight, so a light client with a large product (weight 0.0005, norm 1e4x)
    # would carry its size into everyone's block and its rounding with it.
    least = [i for i, r in enumerate(ranks) if r == min(ranks)]
    j = max(least, key=lambda i: (p.weights[i], i)) if p.whole else -1
    k = sum(r for i, r in enumerate(ranks) if i != j)
    d_out, d_in = p.layout.d_out, p.layout.d_in
    store = _F64 if dense else _F32  # a dense residual is the float64 product of the factors
    left = torch.empty(d_out, k, dtype=store)
    right = torch.empty(k, d_in, dtype=store)
    # never in place: .to() returns a float64 input itself
    neg_b_j = p.updates[j].B.to(_F64) * -p.scalings[j] if j >= 0 else None
    col = 0
    for i, (u, w, s) in enumerate(zip(p.updates, p.weights, p.scalings, strict=True)):
        if i == j:
            continue
        r = ranks[i]
        # Float64 arithmetic written straight into the factors: one rounding, two passes. A
        # 1-element float64 tensor (unlike a Python scalar) makes the product run in float64.
        if neg_b_j is None:
            torch.mul(u.B, _f64(w * s), out=left[:, col : col + r])
        else:
            shared = neg_b_j.shape[1]  # r_j <= r_i: j has the least rank
            torch.mul(torch.add(neg_b_j, u.B[:, :shared], alpha=s), w, out=left[:, col : col + shared])
            if r > shared:
                torch.mul(u.B[:, shared:], _f64(w * s), out=left[:, col + shared : col + r])
        torch.sub(u.A, a_mean[:r], out=right[col : col + r])
        col += r
    if dense:
        return Residual(dense=left @ right)
    return Residual(left=left, right=right)


def _f64(value: float) -> Tensor:
    return torch.tensor([value], dtype=_F64)


def _svd(p: Prepared) -> ModuleResult:
    rank, dtype = p.layout.rank, p.layout.dtype
    # B^T as rows (the layout split_svd works in), gathered and upcast in one pass.
    b_rows = _rows64([u.B.mT for u in p.updates])
    a_rows = _rows64([u.A for u in p.updates])
    mid = torch.tensor([ws for ws, r in zip(p.products, p.ranks, strict=True) for _ in range(r)], dtype=_F64)
    split = split_svd(b_rows, a_rows, mid.to(a_rows.device), rank, residual=p.fine)
    b_out, a_out = pad_rank(_cast(split.B, dtype), _cast(split.A, dtype), rank)
    if p.layout.residual == "none":
        return ModuleResult(a_out, b_out, 1.0, None)
    if p.fine:
        assert split.left is not None and split.right is not None  # asked for with residual=True
        return ModuleResult(a_out, b_out, 1.0, _residual(split.left, split.right, p.layout))
    # The exact update minus the *cast* adapter, as a concatenation: it absorbs the rounding.
    roots = [math.sqrt(ws) for ws in p.products]
    n = split.B.shape[1]
    left, right = _concat(p, roots, extra=(b_out[:, :n], a_out[:n], -1.0))
    return ModuleResult(a_out, b_out, 1.0, _residual(left, right, p.layout))


def _stack(p: Prepared) -> ModuleResult:
    b_hi, a_hi = _concat(p, [math.sqrt(ws) for ws in p.products], dtype=_F64)
    b_out, a_out = pad_rank(_cast(b_hi, p.layout.dtype), _cast(a_hi, p.layout.dtype), p.layout.rank)
    if p.layout.residual == "none":
        return ModuleResult(a_out, b_out, 1.0, None)
    k = b_hi.shape[1]
    b_back, a_back = b_out[:, :k].to(_F64), a_out[:k].to(_F64)
    # B A - B' A' = (B - B') A + B' (A - A'): rank 2K, exact.
    left, right = torch.cat([b_hi - b_back, b_back], 1), torch.cat([a_hi, a_hi - a_back], 0)
    return ModuleResult(a_out, b_out, 1.0, _residual(left, right, p.layout))


def _residual(left: Tensor, right: Tensor, layout: OutputLayout) -> Residual:
    """``left @ right`` in the layout's form, zero-padded to its rank when fewer directions survived."""
    if layout.residual == "dense":
        return Residual(dense=left.to(_F64) @ right.to(_F64))
    k, have = layout.residual_rank, left.shape[1]
    if have == k:
        return Residual(left=left, right=right)
    padded_l = left.new_zeros(left.shape[0], k, dtype=_F32)
    padded_r = right.new_zeros(k, right.shape[1], dtype=_F32)
    padded_l[:, :have], padded_r[:have] = left, right
    return Residual(left=padded_l, right=padded_r)


def _concat(
    p: Prepared,
    scales: Sequence[float],
    *,
    extra: tuple[Tensor, Tensor, float] | None = None,
    dtype: torch.dtype = _F32,
) -> tuple[Tensor, Tensor]:
    """``[c_1 B_1 | ... | c_N B_N]`` and ``[c_1 A_1 ; ... ; c_N A_N]`` in ``dtype``.

    ``extra`` is a ``(B, A, c)`` triple appended after the clients; its ``c`` scales B only.
    """
    bs = [u.B for u in p.updates]
    as_ = [u.A for u in p.updates]
    factors = list(scales)
    a_factors = list(scales)
    if extra is not None:
        bs.append(extra[0])
        as_.append(extra[1])
        factors.append(extra[2])
        a_factors.append(1.0)
    # cat promotes exactly (bf16 -> f32 -> f64); scaling afterwards rounds once, in dtype.
    left, right = torch.cat(bs, 1).to(dtype), torch.cat(as_, 0).to(dtype)
    ranks = torch.tensor([b.shape[1] for b in bs], device=left.device)
    left.mul_(torch.tensor(factors, dtype=dtype, device=left.device).repeat_interleave(ranks))
    right.mul_(torch.tensor(a_factors, dtype=dtype, device=left.device).repeat_interleave(ranks)[:, None])
    return left, right


def _rows64(blocks: Sequence[Tensor]) -> Tensor:
    """Row blocks stacked into one contiguous float64 tensor (cat upcasts while copying)."""
    out = blocks[0].new_empty(sum(b.shape[0] for b in blocks), blocks[0].shape[1], dtype=_F64)
    return torch.cat(list(blocks), 0, out=out)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    if t.dtype == dtype:
        out = t.contiguous()
    elif not t.is_contiguous() and t.mT.is_contiguous():  # a transposed view: convert, then transpose
        out = t.mT.to(dtype).mT.contiguous()
    else:
        out = t.to(dtype, memory_format=torch.contiguous_format)
    if dtype == torch.float16 and not bool(torch.isfinite(out).all()):
        raise AggregationError(f"{NOT_FINITE} in float16: the global adapter overflows; use bfloat16 or float32")
    return out


def _conform(result: ModuleResult, layout: OutputLayout) -> ModuleResult:
    """``result`` if its shapes are the layout's (a broken rule here would corrupt a streamed file)."""
    got = (tuple(result.A.shape), tuple(result.B.shape))
    if result.R is not None and tuple(result.R.shape) != (layout.rank, layout.rank):
        raise AggregationError(f"internal error: lora_R is {tuple(result.R.shape)}, the rank is {layout.rank}")
    res = result.residual
    got_res: tuple[tuple[int, ...], ...] = ()
    if res is not None:
        got_res = (tuple(res.dense.shape),) if res.dense is not None else tuple(tuple(t.shape) for t in res.factors())
    if got != layout.adapter_shapes or got_res != layout.residual_shapes or result.A.dtype != layout.dtype:
        raise AggregationError(
            f"internal error: the aggregate has shapes {got} {got_res}, its layout says"
            f" {layout.adapter_shapes} {layout.residual_shapes}"
        )
    return result


#: the math of each :attr:`StrategySpec.rule <chorus_mq.strategy.StrategySpec.rule>`
_RULES: dict[Rule, Callable[[Prepared], ModuleResult]] = {
    "fedavg": _fedavg,
    "fedex": _fedex,
    "svd": _svd,
    "stack": _stack,
    "shared": _shared,
    "sandwich": _sandwich,
}
