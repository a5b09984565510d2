"""Aggregation strategies for one module: fedavg, fedex-lora, svd and stack.

All but fedavg are exact: ``scaling * B @ A + residual == sum_i w_i s_i B_i A_i`` with
``w`` normalised. Inputs of any float dtype are used at their exact values (upcast);
order and dtypes are fixed, so the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.lowrank import factored_svd
from chorus_mq.factors import Residual
from chorus_mq.aggregation.updates import ClientUpdate, ModuleResult, Prepared, prepare
from chorus_mq.errors import AggregationError

STRATEGIES = ("fedavg", "fedex-lora", "svd", "stack")

_F32 = torch.float32
_F64 = torch.float64
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def aggregate_module(
    updates: Sequence[ClientUpdate],
    strategy: str = "fedex-lora",
    *,
    out_rank: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> ModuleResult:
    """Aggregate one module's client updates into a global adapter and its residual.

    * ``fedavg``: weighted means of A and of B (B rescaled to the output scaling);
      inexact by design, no residual. A baseline, never the default.
    * ``fedex-lora``: the same factors plus the exact residual (a copy, no factorisation).
    * ``svd``: the best rank-``out_rank`` approximation (default: the largest client
      rank), scaling 1.0; only those singular directions are formed, and the residual is
      the exact update minus the adapter, as for fedex-lora a concatenation.
    * ``stack``: all client factors side by side (rank ``sum r_i``), scaling 1.0.

    ``out_rank`` larger than a strategy's natural rank zero-pads; only svd truncates.
    When ``out_dtype`` is coarser than float32 the residual also absorbs the cast error.
    """
    if strategy not in STRATEGIES:
        raise AggregationError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if out_dtype not in _OUT_DTYPES:
        raise AggregationError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if out_rank is not None and (isinstance(out_rank, bool) or not isinstance(out_rank, int) or out_rank < 1):
        raise AggregationError(f"out_rank must be a positive int or None, got {out_rank!r}")
    return _RULES[strategy](prepare(updates), out_rank, out_dtype)


def _fedavg(p: Prepared, out_rank: int | None, out_dtype: torch.dtype) -> ModuleResult:
    return _averaged(p, _natural_rank("fedavg", max(p.ranks), out_rank), out_dtype, exact=False)


def _fedex(p: Prepared, out_rank: int | None, out_dtype: torch.dtype) -> ModuleResult:
    return _averaged(p, _natural_rank("fedex-lora", max(p.ranks), out_rank), out_dtype, exact=True)


def _averaged(p: Prepared, rank: int, out_dtype: torch.dtype, *, exact: bool) -> ModuleResult:
    """FedAvg factors ``A = sum w_i A_i``, ``B = sum w_i (s_i / s) B_i`` and, if exact, their residual."""
    s_out = p.out_scaling
    device = p.updates[0].A.device
    a_mean = torch.zeros(rank, p.d_in, dtype=_F64, device=device)
    b_mean = torch.zeros(p.d_out, rank, dtype=_F64, device=device)
    for u, w in zip(p.updates, p.weights):
        r = u.A.shape[0]
        a_mean[:r].add_(u.A.to(_F64), alpha=w)
        b_mean[:, :r].add_(u.B.to(_F64), alpha=w * u.scaling / s_out)
    a_out, b_out = _cast(a_mean, out_dtype), _cast(b_mean, out_dtype)
    if not exact or _reproduces_single_client(p, a_out, b_out):
        return ModuleResult(a_out, b_out, s_out, None)
    # R = [sqrt(w_i s_i) B_i ... | -s B_out] @ [sqrt(w_i s_i) A_i ... ; A_out], from the *cast*
    # factors, so the residual also absorbs the rounding of a low-precision adapter.
    roots = [math.sqrt(ws) for ws in p.products]
    left, right = _concat(p, _F32, roots, extra=[(b_out, a_out, -s_out)])
    return ModuleResult(a_out, b_out, s_out, Residual.from_factors(left, right))


def _svd(p: Prepared, out_rank: int | None, out_dtype: torch.dtype) -> ModuleResult:
    rank = out_rank or max(p.ranks)
    # B^T as rows (the layout factored_svd works in), gathered and upcast in one pass.
    b_rows = _rows64([u.B.mT for u in p.updates])
    a_cat = _rows64([u.A for u in p.updates])
    mid = torch.tensor([ws for ws, r in zip(p.products, p.ranks) for _ in range(r)], dtype=_F64)
    # One direction more than the adapter keeps tells whether anything is left over.
    u, v = factored_svd(b_rows.mT, a_cat, mid.to(a_cat.device), drop_after=rank, top=rank + 1)
    if u.shape[1] <= rank:  # the adapter holds the whole update
        return _finish(*_pad(u, v, rank), out_dtype)
    b_out, a_out = _cast(u[:, :rank], out_dtype), _cast(v[:rank], out_dtype)
    # The residual is the exact update minus the *cast* adapter, as a concatenation (a copy,
    # as for fedex-lora): forming the discarded directions would cost d x K^2 more per side.
    roots = [math.sqrt(ws) for ws in p.products]
    left, right = _concat(p, _F32, roots, extra=[(b_out, a_out, -1.0)])
    return ModuleResult(a_out, b_out, 1.0, Residual.from_factors(left, right))


def _stack(p: Prepared, out_rank: int | None, out_dtype: torch.dtype) -> ModuleResult:
    rank = _natural_rank("stack", sum(p.ranks), out_rank)
    b_cat, a_cat = _concat(p, _F64, [math.sqrt(ws) for ws in p.products])
    b_hi, a_hi = _pad(b_cat, a_cat, rank)
    return _finish(b_hi, a_hi, out_dtype)


def _finish(b_hi: Tensor, a_hi: Tensor, out_dtype: torch.dtype) -> ModuleResult:
    """Cast a scaling-1.0 float64 adapter that holds the whole update; the residual is the cast error, if any."""
    b_out, a_out = _cast(b_hi, out_dtype), _cast(a_hi, out_dtype)
    if torch.finfo(out_dtype).eps <= torch.finfo(_F32).eps or b_hi.shape[1] == 0:
        return ModuleResult(a_out, b_out, 1.0, None)
    b_back, a_back = b_out.to(_F64), a_out.to(_F64)
    # B A - B' A' = (B - B') A + B' (A - A'): rank 2r, exact.
    left, right = torch.cat([b_hi - b_back, b_back], 1), torch.cat([a_hi, a_hi - a_back], 0)
    return ModuleResult(a_out, b_out, 1.0, Residual.from_factors(left, right))


def _concat(
    p: Prepared, dtype: torch.dtype, scales: Sequence[float] | None = None, *, extra: Sequence[tuple] = ()
) -> tuple[Tensor, Tensor]:
    """``[c_1 B_1 | ... | c_N B_N]`` and ``[c_1 A_1 ; ... ; c_N A_N]`` in ``dtype``.

    ``extra`` holds ``(B, A, c)`` triples appended after the clients; their ``c`` scales B only.
    """
    bs = [u.B for u in p.updates] + [b for b, _, _ in extra]
    as_ = [u.A for u in p.updates] + [a for _, a, _ in extra]
    # cat promotes exactly (bf16 -> f32 -> f64); scaling afterwards rounds once, in dtype.
    left, right = torch.cat(bs, 1).to(dtype), torch.cat(as_, 0).to(dtype)
    if scales is not None:
        ranks = torch.tensor([b.shape[1] for b in bs], device=left.device)
        per_client = torch.tensor(scales, dtype=dtype, device=left.device)
        ones = torch.ones(len(extra), dtype=dtype, device=left.device)
        extra_b = torch.tensor([c for _, _, c in extra], dtype=dtype, device=left.device)
        left.mul_(torch.cat([per_client, extra_b]).repeat_interleave(ranks))
        right.mul_(torch.cat([per_client, ones]).repeat_interleave(ranks)[:, None])
    return left, right


def _rows64(blocks: Sequence[Tensor]) -> Tensor:
    """Row blocks stacked into one contiguous float64 tensor (cat upcasts while copying)."""
    out = blocks[0].new_empty(sum(b.shape[0] for b in blocks), blocks[0].shape[1], dtype=_F64)
    return torch.cat(blocks, 0, out=out)


def _natural_rank(strategy: str, natural: int, out_rank: int | None) -> int:
    if out_rank is None:
        return natural
    if out_rank < natural:
        raise AggregationError(
            f"out_rank={out_rank} is below the rank {natural} that {strategy} produces for these"
            " clients; only the svd strategy truncates"
        )
    return out_rank


def _pad(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    missing = rank - b.shape[1]
    if missing <= 0:
        return b, a
    return torch.cat([b, b.new_zeros(b.shape[0], missing)], 1), torch.cat([a, a.new_zeros(missing, a.shape[1])], 0)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    out = t.to(dtype).contiguous()
    if dtype == torch.float16 and not bool(torch.isfinite(out).all()):
        raise AggregationError("the global adapter overflows float16; use bfloat16 or float32 as out_dtype")
    return out


def _reproduces_single_client(p: Prepared, a_out: Tensor, b_out: Tensor) -> bool:
    """A lone client whose factors survived the cast unchanged leaves an exactly zero residual."""
    if len(p.updates) != 1:
        return False
    u = p.updates[0]
    r = u.A.shape[0]
    return bool(
        torch.equal(a_out[:r].to(_F64), u.A.to(_F64))
        and torch.equal(b_out[:, :r].to(_F64), u.B.to(_F64))
        and not a_out[r:].any()
    )


_RULES: dict[str, Callable[[Prepared, int | None, torch.dtype], ModuleResult]] = {
    "fedavg": _fedavg,
    "fedex-lora": _fedex,
    "svd": _svd,
    "stack": _stack,
}
