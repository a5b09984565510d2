"""Inputs and outputs of the engine, their validation, the finiteness check and the weighted mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual, update_norm

_F64 = torch.float64
#: the largest update norm a float32 product can hold; beyond it ``B @ A`` overflows where it is applied
_F32_MAX = torch.finfo(torch.float32).max
NOT_FINITE = "the aggregate update is not finite"


@dataclass(frozen=True)
class ClientUpdate:
    """One client's LoRA factors for one module, PEFT layout (``dW = scaling * B @ A``; with ``R``,
    Fed-SB's ``dW = scaling * B @ R @ A``)."""

    A: Tensor  # (r_i, d_in), any float dtype
    B: Tensor  # (d_out, r_i)
    scaling: float  # lora_alpha / r_i, or lora_alpha / sqrt(r_i) with rsLoRA
    weight: float = 1.0  # >= 0; normalised over the updates of one call (plus any absent weight)
    R: Tensor | None = None  # (r_i, r_i): Fed-SB's trained matrix between the frozen B and A


@dataclass(frozen=True)
class ClientMeta:
    """What the output layout of a module depends on: a client's rank, scaling, weight and dtype."""

    rank: int
    scaling: float = 1.0
    weight: float = 1.0
    #: the factors' common dtype (``torch.promote_types(A.dtype, B.dtype)``)
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, update: ClientUpdate) -> ClientMeta:
        """The metadata of an update whose factors were already checked (see :func:`check_factors`)."""
        return cls(
            rank=int(update.A.shape[0]),
            scaling=_number(update.scaling, "scaling"),
            weight=_number(update.weight, "weight"),
            dtype=torch.promote_types(update.A.dtype, update.B.dtype),
        )


@dataclass
class ModuleResult:
    """The global adapter of one module and what it leaves out.

    Exact: ``scaling * B.float() @ A.float() + residual == sum_i w_i s_i B_i A_i``.
    """

    A: Tensor  # (r_out, d_in), out_dtype
    B: Tensor  # (d_out, r_out), out_dtype
    scaling: float
    residual: Residual | None  # None means exactly zero
    #: Fed-SB: the (r_out, r_out) matrix between B and A, so the update is ``scaling * B @ R @ A``
    R: Tensor | None = None


def normalize_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Weights divided by their sum; errors for negative, non-finite or all-zero weights."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise AggregationError(f"weights must be numbers: {exc}") from None
    if len(values) != count:
        raise AggregationError(f"got {len(values)} weights for {count} inputs")
    if count == 0:
        raise AggregationError("nothing to aggregate: the list of inputs is empty")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"weight #{i} is {w}; weights must be finite and >= 0")
    total = math.fsum(values)
    if total <= 0:
        raise AggregationError("all weights are zero; at least one input must count")
    return tuple(w / total for w in values)


def check_factors(i: int, u: object) -> tuple[int, int]:
    """``(d_out, d_in)`` of input ``i`` after checking that it is a well-formed ClientUpdate."""
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
    scaling = _number(u.scaling, "scaling")
    if not math.isfinite(scaling) or scaling < 0:
        raise AggregationError(f"client #{i}: scaling is {u.scaling!r}; it must be a finite number >= 0")
    r = u.R
    if r is not None and (tuple(r.shape) != (a.shape[0], a.shape[0]) or not r.is_floating_point()):
        raise AggregationError(
            f"client #{i}: lora_R is {r.dtype} {tuple(r.shape)}; it must be a float ({a.shape[0]} x {a.shape[0]}),"
            " the rank of the frozen factors"
        )
    return int(b.shape[0]), int(a.shape[1])


def module_dims(updates: Sequence[ClientUpdate]) -> tuple[int, int]:
    """The common ``(d_out, d_in)`` of one module's updates, each checked."""
    if not updates:
        raise AggregationError("nothing to aggregate: the list of updates is empty")
    dims = [check_factors(i, u) for i, u in enumerate(updates)]
    for i, d in enumerate(dims):
        if d != dims[0]:
            raise AggregationError(
                f"client #{i} updates a ({d[0]} x {d[1]}) module, client #0 a ({dims[0][0]} x {dims[0][1]})"
                " one; all must target the same module"
            )
    return dims[0]


def check_finite(result: ModuleResult) -> ModuleResult:
    """``result`` unchanged, or AggregationError when any value (or the adapter's update) is not finite.

    One min/max pass per tensor: NaN and infinity show in it, and it bounds the products,
    so the exact (Gram) norm is only needed near float32's range.
    """
    b = result.B
    if result.R is not None:  # Fed-SB: the update is s (B R) A
        check_finite_tensor(result.R, "lora_R")
        b = (result.B.to(_F64) @ result.R.to(_F64)).to(result.B.dtype)
    bound_a, bound_b = _frobenius_bound(result.A), _frobenius_bound(b)
    _bounded(result.A, b, result.scaling, bound_a * bound_b * abs(result.scaling))
    res = result.residual
    if res is not None:
        if res.dense is not None:
            check_finite_tensor(res.dense, "the residual")
        else:
            left, right = res.factors()
            _bounded(right, left, 1.0, _frobenius_bound(left) * _frobenius_bound(right))
    return result


def check_finite_tensor(t: Tensor, what: str) -> Tensor:
    """``t`` unchanged, or AggregationError naming ``what`` when an entry is NaN or infinite."""
    if not math.isfinite(_frobenius_bound(t)):
        raise AggregationError(f"{NOT_FINITE}: {what} holds NaN or infinite values")
    return t


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted mean accumulated in float64 in the given order, returned in ``tensors[0]``'s dtype.

    For tensors aggregated whole, such as ``modules_to_save`` heads. A non-finite mean
    (a NaN input, or an overflow of the output dtype) raises AggregationError.
    """
    norm = normalize_weights(weights, len(tensors))
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise AggregationError(f"tensor #{i} has dtype {t.dtype}; only float tensors can be averaged")
        if t.shape != first.shape:
            raise AggregationError(f"tensor #{i} has shape {tuple(t.shape)}, tensor #0 {tuple(first.shape)}")
    acc = torch.zeros(first.shape, dtype=_F64, device=first.device)
    for t, w in zip(tensors, norm, strict=True):
        if w > 0:
            acc.add_(t.to(_F64), alpha=w)
    return check_finite_tensor(acc.to(first.dtype), "the weighted mean of a whole tensor")


def _number(value: object, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]  # numpy scalars, 0-d tensors: anything float() takes
    except (TypeError, ValueError):
        if what == "weight":
            raise AggregationError(f"weights must be numbers: got {value!r}") from None
        return math.nan  # reported by the caller with the client's index


def _frobenius_bound(t: Tensor) -> float:
    """``sqrt(numel) * max |t|`` >= the Frobenius norm; NaN or inf when an entry is (NaN propagates)."""
    if not t.numel():
        return 0.0
    low, high = (float(x) for x in torch.aminmax(t))
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return math.sqrt(t.numel()) * max(-low, high)


def _bounded(a: Tensor | None, b: Tensor | None, scaling: float, bound: float) -> None:
    if bound <= _F32_MAX:
        return
    # The bound is loose (a product of norms); only the exact norm of scaling * B @ A decides.
    exact = bound if a is None or b is None or not math.isfinite(bound) else update_norm(a, b, scaling)
    if not exact <= _F32_MAX:
        raise AggregationError(
            f"{NOT_FINITE}: its norm {exact:.3g} exceeds float32's range; check the clients' factors and scalings"
        )


def pad_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``B`` with zero columns and ``A`` with zero rows up to ``rank`` (as they are when already that wide)."""
    missing = rank - b.shape[1]
    if missing <= 0:
        return b, a
    return torch.cat([b, b.new_zeros(b.shape[0], missing)], 1), torch.cat([a, a.new_zeros(missing, a.shape[1])], 0)
