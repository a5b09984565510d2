"""What a module's aggregate looks like, decided from metadata alone (DESIGN.md section 1).

Writers stream a safetensors file whose header names every tensor's shape before any
tensor is written, so the shapes :func:`aggregate_module` returns are fixed by the clients'
ranks, scalings, weights and dtypes, the module shape, the absent weight and the output
options, never by the values. This module holds those rules; the strategies follow them
(zero-padding when fewer directions survive numerically).

Residual ranks (``H`` clients that count, ``K = sum r_i``, ``r`` the adapter rank):

* fedex-lora, float32/float64 adapter: ``R = sum_{i != j} w_i (s_i B_i - s_j B_j)(A_i - A_mean)``
  with ``j`` the heaviest client of least rank, ``K - r_j`` columns, when no weight is absent
  (then ``sum_i w_i (A_i - A_mean) = 0``); ``R = sum_i w_i s_i B_i (A_i - A_mean)``, ``K``
  columns, otherwise. A bf16/fp16 adapter keeps the concatenation
  ``[sqrt(w_i s_i) B_i ... | -s B'] @ [sqrt(w_i s_i) A_i ... ; A']`` of ``K + r`` columns, so the
  residual also absorbs the adapter's rounding; a lone client whose factors survive that
  cast unchanged, with no weight absent, has none.
* svd: the ``min(K, d_out, d_in) - r`` discarded directions; bf16/fp16: the concatenation.
* stack: none; bf16/fp16: the cast error ``(B - B') A + B' (A - A')``, ``2 K`` columns.
* fedavg: none (inexact by design).
* ffa-lora, rolora (rule ``shared``): none. One factor is frozen and shared, so the weighted average of
  the trained one is exact; every client has the one rank of the frozen factor, the adapter is float32
  or float64 (a coarser cast would change the frozen factor clients must match bit for bit).
* fed-sb (rule ``sandwich``): none. B and A are frozen and shared, R (``rank x rank``) is averaged; the
  layout's adapter shapes are the frozen factors', R's is ``(rank, rank)``.

Any residual is dense when that takes fewer numbers than its factors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chorus_mq.aggregation.updates import ClientMeta
from chorus_mq.errors import AggregationError
from chorus_mq.factors import ResidualForm, dense_is_smaller
from chorus_mq.names import Strategy
from chorus_mq.strategy import strategy_spec

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EPS32 = torch.finfo(torch.float32).eps
#: dtypes each float dtype converts to without rounding
_EXACT_CASTS: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.float16: frozenset({torch.float16, torch.float32, torch.float64}),
    torch.bfloat16: frozenset({torch.bfloat16, torch.float32, torch.float64}),
    torch.float32: frozenset({torch.float32, torch.float64}),
    torch.float64: frozenset({torch.float64}),
}


@dataclass(frozen=True)
class OutputLayout:
    """The shapes of one module's aggregate: ``A (rank, d_in)``, ``B (d_out, rank)`` in ``dtype``, and the
    residual (float32): none, ``left (d_out, residual_rank)`` and ``right (residual_rank, d_in)``, or dense."""

    rank: int
    #: index (into the inputs) of the client whose scaling the adapter keeps; -1: scaling 1.0
    scaling_from: int
    residual: ResidualForm
    #: k when the residual is factored, else 0
    residual_rank: int
    d_out: int
    d_in: int
    dtype: torch.dtype = torch.float32

    @property
    def adapter_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(A.shape, B.shape)``."""
        return (self.rank, self.d_in), (self.d_out, self.rank)

    @property
    def residual_shapes(self) -> tuple[tuple[int, int], ...]:
        """``()``, ``(left.shape, right.shape)`` or ``(dense.shape,)``."""
        if self.residual == "factored":
            return (self.d_out, self.residual_rank), (self.residual_rank, self.d_in)
        if self.residual == "dense":
            return ((self.d_out, self.d_in),)
        return ()

    @property
    def residual_nbytes(self) -> int:
        return 4 * sum(a * b for a, b in self.residual_shapes)


@dataclass(frozen=True)
class Holders:
    """The clients that count for one module and their weights, normalised with the absent mass."""

    index: tuple[int, ...]  # positions in the inputs: weight > 0 and scaling != 0
    weights: tuple[float, ...]
    #: no weight is absent (no absent_weight, no zero-scaling client): the weights sum to 1
    whole: bool


def as_strategy(strategy: Strategy | str) -> Strategy:
    """A ``Strategy`` member from a member or its string value."""
    try:
        return Strategy(strategy)
    except ValueError:
        raise AggregationError(f"unknown strategy {strategy!r}; choose one of {', '.join(Strategy.values())}") from None


def check_options(out_rank: int | None, out_dtype: torch.dtype) -> None:
    """AggregationError for an ``out_rank`` or ``out_dtype`` the engine cannot produce."""
    if out_dtype not in _OUT_DTYPES:
        raise AggregationError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if out_rank is not None and (isinstance(out_rank, bool) or not isinstance(out_rank, int) or out_rank < 1):
        raise AggregationError(f"out_rank must be a positive int or None, got {out_rank!r}")


def holders(clients: Sequence[ClientMeta], absent_weight: float = 0.0) -> Holders:
    """Who counts and with which normalised weight; AggregationError for unusable weights or scalings."""
    if not clients:
        raise AggregationError("nothing to aggregate: the list of updates is empty")
    absent = _absent(absent_weight)
    for i, c in enumerate(clients):
        if not isinstance(c.rank, int) or isinstance(c.rank, bool) or c.rank < 1:
            raise AggregationError(f"client #{i}: rank is {c.rank!r}; it must be an int >= 1")
        if not math.isfinite(c.scaling) or c.scaling < 0:
            raise AggregationError(f"client #{i}: scaling is {c.scaling!r}; it must be a finite number >= 0")
        if not math.isfinite(c.weight) or c.weight < 0:
            raise AggregationError(f"weight #{i} is {c.weight}; weights must be finite and >= 0")
        if not c.dtype.is_floating_point:
            raise AggregationError(f"client #{i}: factors must be floating point, got {c.dtype}")
    present = math.fsum(c.weight for c in clients)
    if present <= 0:
        raise AggregationError("all weights are zero; at least one input must count")
    index = tuple(i for i, c in enumerate(clients) if c.weight > 0 and c.scaling != 0)
    if not index:
        raise AggregationError("every client with a nonzero weight has a zero scaling; nothing to aggregate")
    total = present + absent
    # a zero-scaling client is a zero update under its weight: part of the absent mass
    whole = absent == 0 and all(c.scaling != 0 for c in clients if c.weight > 0)
    return Holders(index, tuple(clients[i].weight / total for i in index), whole)


def output_layout(
    strategy: Strategy | str,
    clients: Sequence[ClientMeta | int],
    d_out: int,
    d_in: int,
    *,
    absent_weight: float = 0.0,
    out_rank: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> OutputLayout:
    """The exact shapes ``aggregate_module`` returns for clients with this metadata.

    ``clients`` are ``ClientMeta`` (or bare ranks: scaling 1, weight 1, float32).
    """
    rule = as_strategy(strategy)
    check_options(out_rank, out_dtype)
    if d_out < 1 or d_in < 1:
        raise AggregationError(f"a module is at least 1 x 1, got {d_out} x {d_in}")
    metas = [c if isinstance(c, ClientMeta) else ClientMeta(rank=c) for c in clients]
    who = holders(metas, absent_weight)
    ranks = [metas[i].rank for i in who.index]
    r_max, total = max(ranks), sum(ranks)
    first_max = who.index[ranks.index(r_max)]
    fine = torch.finfo(out_dtype).eps <= _EPS32
    kind = strategy_spec(rule).rule
    if kind in ("shared", "sandwich"):
        if len(set(ranks)) != 1:
            raise AggregationError(
                f"{rule} shares one frozen factor, so every client has its rank; got ranks {sorted(set(ranks))}"
            )
        if out_rank is not None and out_rank != r_max:
            raise AggregationError(f"{rule} keeps the frozen factor's rank {r_max}; out_rank={out_rank} is not it")
        if not fine:
            raise AggregationError(
                f"{rule} publishes float32 (the frozen factor is matched bit for bit), not {out_dtype}"
            )
        rank, scaling_from, k = r_max, first_max, 0
    elif kind in ("fedavg", "fedex"):
        rank, scaling_from = natural_rank(rule, r_max, out_rank), first_max
        if kind == "fedavg":
            k = 0
        elif fine:
            k = total - min(ranks) if who.whole else total
        else:
            lone = who.whole and len(ranks) == 1 and out_dtype in _EXACT_CASTS[metas[first_max].dtype]
            k = 0 if lone else total + r_max
    elif kind == "svd":
        rank, scaling_from = out_rank or r_max, -1
        directions = min(total, d_out, d_in)
        k = max(directions - rank, 0) if fine else total + min(rank, directions)
    else:
        rank, scaling_from = natural_rank(rule, total, out_rank), -1
        k = 0 if fine else 2 * total
    form: ResidualForm = "none" if k == 0 else "dense" if dense_is_smaller(d_out, d_in, k) else "factored"
    return OutputLayout(rank, scaling_from, form, k if form == "factored" else 0, d_out, d_in, out_dtype)


def natural_rank(strategy: Strategy, natural: int, out_rank: int | None) -> int:
    """``out_rank`` when it is at least the strategy's natural rank (zero-padding); the natural rank by default."""
    if out_rank is None:
        return natural
    if out_rank < natural:
        raise AggregationError(
            f"out_rank={out_rank} is below the rank {natural} that {strategy} produces for these"
            " clients; only the svd strategy truncates"
        )
    return out_rank


def _absent(absent_weight: float) -> float:
    try:
        value = float(absent_weight)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(absent_weight, bool) or not math.isfinite(value) or value < 0:
        raise AggregationError(f"absent_weight is {absent_weight!r}; it must be a finite number >= 0")
    return value
