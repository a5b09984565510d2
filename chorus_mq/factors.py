"""Torch-only building blocks that both the adapters and the aggregation layers use.

``Residual`` is the weight-space residual of an aggregation (kept factored unless dense is
smaller); ``update_norm`` bounds a client's module update through r x r Grams; and
``factor_dense`` turns a dense residual into exact low-rank factors. Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from chorus_mq.errors import AggregationError

__all__ = [
    "MAX_CONDITIONING",
    "Residual",
    "ResidualForm",
    "conditioning",
    "dense_is_smaller",
    "factor_dense",
    "update_norm",
]

#: the largest ``||B||_F ||A||_F / ||B @ A||_F`` ingest accepts. Honest factors sit near sqrt(r)
#: (a trained B against PEFT's init A); float64 loses ``eps64 * kappa`` of a product to rounding,
#: so 1e8 keeps the canonical factors exact to ~1e-8 of the client's own update
MAX_CONDITIONING = 1e8

#: how a residual is stored: absent (exactly zero), as ``left @ right`` factors, or dense
ResidualForm = Literal["none", "factored", "dense"]

_F32 = torch.float32
_F64 = torch.float64


def dense_is_smaller(d_out: int, d_in: int, rank: int) -> bool:
    """Whether a dense ``d_out x d_in`` matrix takes fewer numbers than rank-``rank`` factors."""
    return d_out * d_in < rank * (d_out + d_in)


@dataclass
class Residual:
    """Weight-space residual in ``B @ A`` layout, shape ``(d_out, d_in)``, stored as float32.

    Exactly one form is set: the factors ``left (d_out, k)`` and ``right (k, d_in)``
    whose product is the residual, or ``dense``. Other float dtypes and strided views
    are converted on construction. Fold ``to_dense().T`` into a GPT-2 ``Conv1D`` weight (see
    :meth:`fold_into`), since that layer stores its weight transposed.
    """

    left: Tensor | None = None
    right: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self) -> None:
        factored = self.left is not None or self.right is not None
        if factored == (self.dense is not None):
            raise AggregationError("a Residual needs exactly one form: left and right factors, or dense")
        if self.dense is not None:
            if self.dense.ndim != 2:
                raise AggregationError(f"a dense residual must be 2-D, got shape {tuple(self.dense.shape)}")
            self.dense = _as_f32(self.dense)
            return
        if self.left is None or self.right is None:
            raise AggregationError("a factored Residual needs both left and right")
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise AggregationError(
                f"residual factors do not pair: left {tuple(self.left.shape)}, right {tuple(self.right.shape)}"
            )
        self.left, self.right = _as_f32(self.left), _as_f32(self.right)

    @classmethod
    def from_factors(cls, left: Tensor, right: Tensor) -> Residual | None:
        """The smaller representation of ``left @ right``; None when the rank is zero.

        A dense result is multiplied in float64 so that it stays exact to float32.
        """
        d_out, k = left.shape
        d_in = right.shape[1]
        if k == 0:
            return None
        if dense_is_smaller(d_out, d_in, k):
            return cls(dense=(left.to(_F64) @ right.to(_F64)).to(_F32))
        return cls(left=left, right=right)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` of a factored residual; AggregationError for a dense one."""
        if self.left is None or self.right is None:
            raise AggregationError("this residual is dense; it has no factors")
        return self.left, self.right

    @property
    def form(self) -> ResidualForm:
        return "dense" if self.dense is not None else "factored"

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return int(self.dense.shape[0]), int(self.dense.shape[1])
        left, right = self.factors()
        return int(left.shape[0]), int(right.shape[1])

    @property
    def rank(self) -> int:
        """Number of factor columns; for a dense residual, the upper bound ``min(shape)``."""
        return min(self.shape) if self.dense is not None else int(self.factors()[0].shape[1])

    @property
    def nbytes(self) -> int:
        parts = (self.dense,) if self.dense is not None else self.factors()
        return sum(p.numel() * p.element_size() for p in parts)

    def to_dense(self) -> Tensor:
        """The ``(d_out, d_in)`` float32 matrix (factors multiplied in float64)."""
        if self.dense is not None:
            return self.dense
        left, right = self.factors()
        return (left.to(_F64) @ right.to(_F64)).to(_F32)

    def matmul_right(self, x: Tensor) -> Tensor:
        """``residual @ x`` without forming the dense matrix (float32)."""
        x = x.to(_F32)
        if self.dense is not None:
            return self.dense @ x
        left, right = self.factors()
        return left @ (right @ x)

    def fold_into(self, weight: Tensor, *, fan_in_fan_out: bool = False) -> Tensor:
        """``weight + residual`` in the weight's layout and dtype.

        ``fan_in_fan_out=True`` is GPT-2's ``Conv1D``, whose weight is ``(d_in, d_out)``.
        Folding into a bf16 weight loses about 11% of the residual to rounding; keep the
        base in float32 (or the residual as a separate adapter) when that matters.
        """
        delta = self.to_dense()
        if fan_in_fan_out:
            delta = delta.T
        if tuple(weight.shape) != tuple(delta.shape):
            raise AggregationError(
                f"residual {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}"
                f" (fan_in_fan_out={fan_in_fan_out})"
            )
        work = torch.promote_types(weight.dtype, _F32)
        return (weight.to(work) + delta.to(work)).to(weight.dtype)


def _as_f32(t: Tensor) -> Tensor:
    if not t.is_floating_point():
        raise AggregationError(f"residual tensors must be floating point, got {t.dtype}")
    # contiguous, because safetensors (and most writers) refuse strided views; one copy
    # converts dtype and layout together (a transposed float64 factor is common here)
    if t.dtype == _F32:
        return t.contiguous()
    if not t.is_contiguous() and t.mT.is_contiguous():
        # a transposed view: converting first and transposing in float32 is ~3x faster than one
        # strided converting copy
        return t.mT.to(_F32).mT.contiguous()
    return t.to(_F32, memory_format=torch.contiguous_format)


def update_norm(A: Tensor, B: Tensor, scaling: float = 1.0) -> float:
    """``||scaling * B @ A||_F`` without forming the product: ``sqrt(tr((A A^T)(B^T B)))`` in float64.

    Returns ``inf`` when the value (or anything on the way) is not finite, so callers can
    refuse updates whose factors are finite but whose product overflows.
    """
    a, b = A.to(_F64), B.to(_F64)
    gram_a, gram_b = a @ a.mT, b.mT @ b
    trace = float((gram_a * gram_b).sum())
    if not math.isfinite(trace):
        return math.inf
    # a negative trace is rounding of an (almost) zero update: it is a squared norm. The
    # scaling multiplies the root, so a huge scaling overflows to inf instead of raising.
    norm = abs(float(scaling)) * math.sqrt(max(trace, 0.0))
    return norm if math.isfinite(norm) else math.inf


def conditioning(A: Tensor, B: Tensor, norm: float, scaling: float = 1.0) -> float:
    """``|scaling| ||B||_F ||A||_F / norm`` with ``norm = ||scaling B A||_F``: how much the factors cancel.

    Scale-invariant (``B c, A / c`` leave it unchanged); 1.0 when a factor is zero (the product is
    exactly zero), ``inf`` for nonzero factors whose product is zero.
    """
    spread = abs(float(scaling)) * float(A.to(_F64).norm()) * float(B.to(_F64).norm())
    if spread == 0.0:
        return 1.0
    return spread / norm if norm > 0 else math.inf


def factor_dense(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Exact low-rank factors ``(left, right)`` of a dense residual: an SVD in float64 that drops
    only directions below float32 resolution (they are not representable in the fp32 residual)."""
    U, S, Vh = torch.linalg.svd(dense.to(_F64), full_matrices=False)
    tol = (float(S[0]) if S.numel() else 0.0) * max(dense.shape) * torch.finfo(_F32).eps
    k = int((tol < S).sum())
    root = S[:k].sqrt()
    return (U[:, :k] * root).to(_F32), (root[:, None] * Vh[:k]).to(_F32)
