"""A canonical factorisation of each client's ``B @ A`` that depends on the product alone (DESIGN.md section 1).

A client chooses how to factorise its update: ``(B c, A / c)`` or ``(B G, G^-1 A)`` leave
``B @ A`` and every product check unchanged, but strategies that average B and A separately
would multiply the cross terms ``B_i A_j`` by ``c``. Rewriting each client as

    A' = c0 * Omega_i Q_i^T          (orthonormal rows scaled by the fixed ROW_NORM = c0)
    B' = (B_i R_i^T) Omega_i^T / c0  (so B' @ A' == B_i @ A_i)

with ``A_i^T = Q_i R_i`` (QR in float64) and ``Omega_i`` the orthogonal Procrustes rotation of
``Q_i^T`` onto a reference computed from the products, gives ``||B'_i|| = ||B_i A_i|| / c0``
and ``||A'_j|| = c0 sqrt(r_j)``: every cross term is bounded by a client's own product norm,
whatever factors it sent. ``Omega_i Q_i^T`` does not depend on which basis of A's row space the
client sent (a rotation of ``Q_i`` rotates the Procrustes problem with it), so the same product
gives the same canonical factors. The reference (the top right singular vectors of the exact
aggregate, signs fixed in weight space) makes the averaged A constructive: clients whose
updates share a row space average to an A of full norm, as a common starting A would.
A client whose product is exactly zero gets zero factors (it averages as an absent client);
directions a rank-deficient B does not use keep rows of norm ``c0`` against zero columns of B'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from chorus_mq.aggregation.lowrank import factored_svd
from chorus_mq.aggregation.updates import ClientUpdate, check_finite_tensor

#: the row norm of every canonical A: PEFT's Kaiming-uniform init draws rows of norm ~ 1/sqrt(3)
ROW_NORM = 1.0 / math.sqrt(3.0)

_F64 = torch.float64


def canonical_updates(updates: Sequence[ClientUpdate], products: Sequence[float]) -> tuple[ClientUpdate, ...]:
    """Each update with float64 factors ``(A', B')``: same rank, scaling, weight and ``B' @ A'`` (to float64).

    ``products`` are the weights ``w_i s_i`` of the products in the aggregate, used only to pick
    the common reference the rotations align to.
    """
    for i, u in enumerate(updates):  # before any decomposition: LAPACK does not converge on NaN
        check_finite_tensor(u.A, f"client #{i}'s A")
        check_finite_tensor(u.B, f"client #{i}'s B")
    bases = [_row_basis(u) for u in updates]
    ref = _reference(bases, products, max(int(u.A.shape[0]) for u in updates))
    return tuple(_canonical(u, left, q, ref) for u, (left, q) in zip(updates, bases, strict=True))


def _row_basis(u: ClientUpdate) -> tuple[Tensor, Tensor]:
    """``(B R^T, Q)`` with ``A^T = Q R``: ``B @ A == (B R^T) @ Q^T`` and Q has orthonormal columns."""
    q, r = torch.linalg.qr(u.A.to(_F64).mT)  # (d_in, k), (k, r_i) with k = min(d_in, r_i)
    # B (c) times R (1/c): each column of B meets its own scale, so rebalancing cancels exactly
    return u.B.to(_F64) @ r.mT, q


def _reference(bases: Sequence[tuple[Tensor, Tensor]], products: Sequence[float], rank: int) -> Tensor:
    """``(rank, d_in)``: unit rows along the aggregate's top right singular vectors (zero rows past its rank)."""
    left = torch.cat([lt * ws for (lt, _), ws in zip(bases, products, strict=True)], 1)
    right = torch.cat([q.mT for _, q in bases], 0)
    _, v = factored_svd(left, right, top=rank)
    norms = v.norm(dim=1, keepdim=True)
    v = torch.where(norms > 0, v / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(v))
    # signs in weight space (the largest entry of each row positive), not in a basis the factors chose
    pivot = v.abs().argmax(dim=1, keepdim=True)
    signs = v.gather(1, pivot).sign()
    v = v * torch.where(signs == 0, torch.ones_like(signs), signs)
    out = v.new_zeros(rank, v.shape[1])
    out[: v.shape[0]] = v
    return out


def _canonical(u: ClientUpdate, left: Tensor, q: Tensor, ref: Tensor) -> ClientUpdate:
    rank, k = int(u.A.shape[0]), int(q.shape[1])
    if not bool(left.any()):  # a zero product is a zero update, in its factors too (as an absent client)
        return ClientUpdate(
            A=left.new_zeros(rank, q.shape[0]),
            B=left.new_zeros(left.shape[0], rank),
            scaling=u.scaling,
            weight=u.weight,
        )
    # Procrustes: the rotation taking Q^T closest to the reference's first k rows
    u_, _, vh = torch.linalg.svd(ref[:k] @ q)
    omega = u_ @ vh
    a = left.new_zeros(rank, q.shape[0])
    b = left.new_zeros(left.shape[0], rank)
    a[:k] = (omega @ q.mT) * ROW_NORM
    b[:, :k] = (left @ omega.mT) / ROW_NORM
    return ClientUpdate(A=a, B=b, scaling=u.scaling, weight=u.weight)
