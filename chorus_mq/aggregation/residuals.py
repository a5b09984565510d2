"""Exact sums of residuals of one module, without re-factorising.

A client folds each round's residual into its correction and the compaction task sums
rounds into a snapshot: concatenating factors is exact and costs a copy, so it is used
while it stays smaller than dense; past that the sum is dense, accumulated in float64.
Either way the form follows from the parts' forms and ranks alone (:func:`sum_layout`),
so writers know the shapes before they compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual, ResidualForm, dense_is_smaller

_F64 = torch.float64
_FORMS: tuple[ResidualForm, ...] = ("none", "factored", "dense")


def residual_layout(residual: Residual | None) -> tuple[ResidualForm, int]:
    """``(form, k)``: ``("none", 0)``, ``("factored", rank)`` or ``("dense", 0)``."""
    if residual is None:
        return "none", 0
    return ("dense", 0) if residual.dense is not None else ("factored", residual.rank)


def sum_layout(parts: Sequence[tuple[str, int]], d_out: int, d_in: int) -> tuple[ResidualForm, int]:
    """The form :func:`sum_residuals` gives parts of these ``(form, rank)`` pairs (see :func:`residual_layout`)."""
    total, dense, present = 0, False, False
    for i, (form, rank) in enumerate(parts):
        if form not in _FORMS:
            raise AggregationError(f"part #{i}: unknown residual form {form!r}; choose one of {', '.join(_FORMS)}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise AggregationError(f"part #{i}: rank must be an int >= 0, got {rank!r}")
        dense |= form == "dense"
        present |= form != "none"
        total += rank if form == "factored" else 0
    if dense or (present and dense_is_smaller(d_out, d_in, total)):
        return "dense", 0
    return ("factored", total) if total else ("none", 0)


def sum_residuals(parts: Sequence[Residual | None]) -> Residual | None:
    """The exact sum of residuals of one module (None parts are zero) in :func:`sum_layout`'s form.

    Factored parts are concatenated (``[L_1 | L_2 ...] @ [R_1 ; R_2 ...]``) while that is
    smaller than dense; otherwise the dense sum is accumulated in float64 and stored fp32.
    """
    present = [p for p in parts if p is not None]
    if not present:
        return None
    shape = present[0].shape
    for i, p in enumerate(present):
        if not isinstance(p, Residual):
            raise AggregationError(f"part #{i} is a {type(p).__name__}, not a Residual")
        if p.shape != shape:
            raise AggregationError(f"cannot sum residuals of shapes {shape} and {p.shape}")
    form, _ = sum_layout([residual_layout(p) for p in present], *shape)
    if form == "none":
        return None
    if form == "factored":
        if len(present) == 1:
            return present[0]
        pairs = [p.factors() for p in present]
        return Residual(left=torch.cat([left for left, _ in pairs], 1), right=torch.cat([r for _, r in pairs], 0))
    total = torch.zeros(shape, dtype=_F64)
    for p in present:
        if p.dense is not None:
            total.add_(p.dense.to(_F64))
        else:
            left, right = p.factors()
            # addmm accumulates the product into the sum without a second d_out x d_in temporary
            total.addmm_(left.to(_F64), right.to(_F64))
    return Residual(dense=total)
