"""Fed-SB's frame and its PEFT form: B and A frozen and shared, the r x r matrix R trained between them.

A module's update is ``s * B @ R @ A``. Round 0 publishes the frame (B, A) and ``R = 0``; every round
averages R alone (:func:`chorus_mq.aggregation.strategies.aggregate_module`, rule ``sandwich``), which is
exact because B and A are the same for every client. Pure functions on tensors (docs/DESIGN.md, Fed-SB).

The default frame (:func:`frame`) is seeded per module: B's columns and A's rows are orthonormal, drawn
from a Gaussian and orthonormalised by QR in float64, so the map ``R -> B R A`` preserves the Frobenius
norm (``||B R A|| = ||R||``): a step on R is a step of the same size on the update. An operator may
supply its own B and A instead (``--initial-adapter``), e.g. the top singular vectors of a gradient on
its calibration data as LoRA-SB proposes.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from chorus_mq.errors import AggregationError

_F64 = torch.float64
_F32 = torch.float32


def _generator(seed: int, module: str, part: str) -> torch.Generator:
    """A generator fixed by (seed, module, part): the same frame on every machine, independent per module."""
    digest = hashlib.sha256(f"fed-sb-frame\0{seed}\0{module}\0{part}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """``rows x cols`` with orthonormal columns (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=_F64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    out: Tensor = q * signs
    return out


def frame(d_out: int, d_in: int, rank: int, *, seed: int, module: str) -> tuple[Tensor, Tensor]:
    """The default frozen frame of one module, float32: ``B (d_out, rank)`` with orthonormal columns and
    ``A (rank, d_in)`` with orthonormal rows, seeded by ``(seed, module)``; byte-identical for the same
    arguments."""
    if not 1 <= rank <= min(d_out, d_in):
        raise AggregationError(
            f"module {module!r}: fed-sb needs 1 <= rank <= min(d_out, d_in) = {min(d_out, d_in)}, got {rank}"
        )
    b = _orthonormal_columns(d_out, rank, _generator(seed, module, "B"))
    a = _orthonormal_columns(d_in, rank, _generator(seed, module, "A")).T
    return b.to(_F32).contiguous(), a.to(_F32).contiguous()


def check_r(module: str, r: Tensor, rank: int) -> Tensor:
    """``r`` unchanged if it is a finite float ``(rank, rank)`` matrix; AggregationError naming the module."""
    if r.ndim != 2 or tuple(r.shape) != (rank, rank) or not r.is_floating_point():
        raise AggregationError(
            f"module {module!r}: lora_R is {r.dtype} {list(r.shape)}; this fed-sb federation's R is "
            f"float [{rank}, {rank}] (its rank)"
        )
    if not bool(torch.isfinite(r).all()):
        raise AggregationError(f"module {module!r}: lora_R holds NaN or infinite values")
    return r


def peft_factors(b: Tensor, r: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The standard PEFT factors of ``B @ R @ A``: ``(lora_A, lora_B) = (A, B @ R)``, float32, the product
    taken in float64 (one rounding)."""
    if b.shape[1] != r.shape[0] or r.shape[1] != a.shape[0]:
        raise AggregationError(f"B {list(b.shape)}, R {list(r.shape)} and A {list(a.shape)} do not chain")
    return a.to(_F32).contiguous(), (b.to(_F64) @ r.to(_F64)).to(_F32).contiguous()
