"""Shared helpers for the aggregation tests: random clients and the float64 dense oracle."""

from __future__ import annotations

import math

import torch

from chorus_mq.aggregation import ClientUpdate, ModuleResult
from chorus_mq.names import Strategy
from chorus_mq.strategy import strategy_spec

F64 = torch.float64


def make_clients(
    d_out: int,
    d_in: int,
    ranks,
    *,
    seed: int = 0,
    weights=None,
    rslora: bool = False,
    alpha: float = 16.0,
    dtype: torch.dtype = torch.float32,
) -> list[ClientUpdate]:
    """Random clients with nonzero A and B; scaling alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    gen = torch.Generator().manual_seed(seed)
    weights = weights if weights is not None else [1.0 + i for i in range(len(ranks))]
    return [
        ClientUpdate(
            A=(torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)).to(dtype),
            B=torch.randn(d_out, r, generator=gen).to(dtype),
            scaling=alpha / (math.sqrt(r) if rslora else r),
            weight=w,
        )
        for r, w in zip(ranks, weights, strict=False)
    ]


def oracle(updates: list[ClientUpdate], absent_weight: float = 0.0) -> torch.Tensor:
    """``sum_i w_i s_i B_i A_i`` in float64 from the inputs' exact values, weights normalised
    over the updates' weights plus ``absent_weight`` (clients that count as zero updates)."""
    total = math.fsum(u.weight for u in updates) + absent_weight
    m = torch.zeros(updates[0].B.shape[0], updates[0].A.shape[1], dtype=F64)
    for u in updates:
        m += (u.weight / total * u.scaling) * (u.B.to(F64) @ u.A.to(F64))
    return m


def adapter_delta(res: ModuleResult) -> torch.Tensor:
    return res.scaling * (res.B.to(F64) @ res.A.to(F64))


def total_delta(res: ModuleResult) -> torch.Tensor:
    delta = adapter_delta(res)
    return delta if res.residual is None else delta + res.residual.to_dense().to(F64)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).norm() / ref.norm())


#: the strategies whose clients train both factors freely (the linear ones freeze a shared factor and
#: have their own tests: test_linear.py)
FREE = [s for s in Strategy if not strategy_spec(s).frozen_shared]
