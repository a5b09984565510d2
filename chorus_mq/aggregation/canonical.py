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
gives the same canonical factors. The reference (a weighted Procrustes mean of the clients' row
bases, see :func:`_reference`) makes the averaged A constructive: clients whose updates share a
row space average to an A of full norm, as a common starting A would.
A client whose product is exactly zero gets zero factors (it averages as an absent client);
directions a rank-deficient B does not use keep rows of norm ``c0`` against zero columns of B'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

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
    """``(rank, d_in)`` orthonormal rows: the contribution-weighted Procrustes mean of the clients' row bases.

    It starts from the right singular vectors of the largest contributor's own product (among
    the clients of largest rank; signs fixed in weight space), rotates every client's basis onto
    it and takes the polar factor of their sum weighted by ``|w_i s_i| ||B_i A_i||``. Everything
    here depends on products only, and costs ``O(N r^2 d_in)``: no Gram of all clients' factors.
    """
    d_in = bases[0][1].shape[0]
    weights = [abs(ws) * float(left.norm()) for (left, _), ws in zip(bases, products, strict=True)]
    ks = [q.shape[1] for _, q in bases]
    first = max(range(len(bases)), key=lambda i: (ks[i], weights[i], -i))
    left, q = bases[first]
    # right singular vectors of left @ q^T are q @ (eigenvectors of left^T left), largest first
    _, vecs = torch.linalg.eigh(left.mT @ left)
    start = _positive_rows((q @ vecs.flip(1)).mT)
    total = left.new_zeros(rank, d_in)
    for (_, q_i), weight in zip(bases, weights, strict=True):
        if weight > 0:
            k = q_i.shape[1]
            total[:k] += weight * (_procrustes(start[:k], q_i) @ q_i.mT)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    polar: Tensor = u @ vh
    return polar


def _procrustes(ref: Tensor, q: Tensor) -> Tensor:
    """The orthogonal ``Omega`` (k x k) that takes ``q^T`` closest to ``ref``: the polar factor of ``ref @ q``."""
    u, _, vh = torch.linalg.svd(ref @ q)
    omega: Tensor = u @ vh
    return omega


def _positive_rows(rows: Tensor) -> Tensor:
    """Each row with its largest entry positive: a sign convention in weight space, not in a basis the factors chose."""
    pivot = rows.abs().argmax(dim=1, keepdim=True)
    signs = rows.gather(1, pivot).sign()
    return rows * torch.where(signs == 0, torch.ones_like(signs), signs)


def _canonical(u: ClientUpdate, left: Tensor, q: Tensor, ref: Tensor) -> ClientUpdate:
    rank, k = int(u.A.shape[0]), int(q.shape[1])
    if not bool(left.any()):  # a zero product is a zero update, in its factors too (as an absent client)
        return ClientUpdate(
            A=left.new_zeros(rank, q.shape[0]),
            B=left.new_zeros(left.shape[0], rank),
            scaling=u.scaling,
            weight=u.weight,
        )
    omega = _procrustes(ref[:k], q)
    # the scale folded into the k x k rotation: one pass over each large factor
    a, b = (omega * ROW_NORM) @ q.mT, left @ (omega.mT / ROW_NORM)
    if k < rank:  # fewer directions than the rank (d_in < r): zero rows and columns pad it
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
    return ClientUpdate(A=a, B=b, scaling=u.scaling, weight=u.weight)
