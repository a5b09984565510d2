"""Exact SVD of a factored product ``L @ diag(mid) @ R`` without forming it, and residual chaining.

The Gram matrices of the factors only *precondition* the problem: every output is
written as ``L @ (small) `` and ``(small) @ R`` where the small matrices multiply back to
the identity, so ``U @ V == L @ diag(mid) @ R`` holds to float64 rounding however badly
conditioned the inputs are. Conditioning only decides how close the top directions are
to the true singular vectors (to ~1e-8 when the factors are not close to rank-deficient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from chorus_mq.aggregation.residual import Residual
from chorus_mq.errors import AggregationError

#: a direction whose weight-space norm is below RTOL times the largest one is numerically zero
RTOL = 1e-7

_F64 = torch.float64
_F32 = torch.float32
_EPS64 = torch.finfo(_F64).eps
_EPS32_UNIT = torch.finfo(_F32).eps / 2  # unit roundoff of float32
# Cholesky pivots of the unit-diagonal Gram below this mean nearly dependent columns; the
# eigen-decomposition then handles them without losing orthogonality in the others.
_MIN_PIVOT = 1e-4


def factored_svd(left: Tensor, right: Tensor, mid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Singular directions of ``M = left @ diag(mid) @ right`` as balanced float64 factors.

    Returns ``(U, V)``, ``U (d_out, k)`` and ``V (k, d_in)``, sorted by decreasing singular
    value, with ``U[:, j] ~ u_j sqrt(s_j)``, ``V[j] ~ sqrt(s_j) v_j^T`` and ``U @ V == M``.
    Nothing is dropped. Costs ``O((d_out + d_in) K^2 + K^3)``; when ``K`` exceeds
    ``min(d_out, d_in)`` the dense ``M`` is the smaller problem and is decomposed instead.
    """
    lf, rf = left.to(_F64), right.to(_F64)
    d_out, k_in = lf.shape
    d_in = rf.shape[1]
    mid = torch.ones(k_in, dtype=_F64, device=lf.device) if mid is None else mid.to(_F64)
    if k_in > min(d_out, d_in):
        return _dense_svd((lf * mid) @ rf)
    gram_l, gram_r = lf.mT @ lf, rf @ rf.mT
    # Columns that contribute nothing are removed exactly; they would make the Grams singular.
    live = ((gram_l.diagonal() > 0) & (gram_r.diagonal() > 0) & (mid != 0)).nonzero().squeeze(1)
    k = live.numel()
    if k == 0:
        return lf.new_zeros(d_out, 0), rf.new_zeros(0, d_in)
    whiten_l, unwhiten_l = _whitener(gram_l[live][:, live])
    whiten_r, unwhiten_r = _whitener(gram_r[live][:, live])
    core = unwhiten_l @ (mid[live, None] * unwhiten_r.mT)
    vecs = _right_singular_vectors(core)
    scaled = core @ vecs  # columns u_j * s_j
    root = scaled.norm(dim=0).sqrt()
    root = torch.where(root > 0, root, torch.ones_like(root))
    small_l = lf.new_zeros(k_in, k)
    small_l[live] = whiten_l @ (scaled / root)
    small_r = rf.new_zeros(k, k_in)
    small_r[:, live] = (root[:, None] * vecs.mT) @ whiten_r.mT
    return lf @ small_l, small_r @ rf


def keep_significant(u: Tensor, v: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Drop the directions ``u[:, j] v[j]`` whose norm is at most ``RTOL`` times the largest, or ``floor``."""
    norms = u.norm(dim=0) * v.norm(dim=1)
    if norms.numel() == 0:
        return u, v
    keep = norms > max(RTOL * float(norms.max()), floor)
    if bool(keep.all()):
        return u, v
    idx = keep.nonzero().squeeze(1)
    return u[:, idx], v[idx]


def compress(left: Tensor, right: Tensor) -> Residual | None:
    """``left @ right`` re-compressed exactly: only numerically zero directions are dropped.

    Besides ``RTOL``, a direction is zero when it is below what rounding the given
    factors to float32 can change: ``eps32 * sum_j |left_j| |right_j|`` bounds that.
    """
    lf, rf = left.to(_F64), right.to(_F64)
    noise = _EPS32_UNIT * float((lf.norm(dim=0) * rf.norm(dim=1)).sum())
    u, v = keep_significant(*factored_svd(lf, rf), floor=noise)
    return Residual.from_factors(u, v)


def chain_residuals(prev: Residual | None, new: Residual | None) -> Residual | None:
    """The sum of two residuals, re-compressed exactly (dense when that is smaller).

    A dense operand makes the sum dense. None stands for a zero residual.
    """
    if prev is None or new is None:
        return new if prev is None else prev
    if prev.shape != new.shape:
        raise AggregationError(f"cannot chain residuals of shapes {prev.shape} and {new.shape}")
    if prev.dense is None and new.dense is None:
        return compress(torch.cat([prev.left, new.left], 1), torch.cat([prev.right, new.right], 0))
    total = _dense64(prev) + _dense64(new)
    if not bool(total.any()):
        return None
    return Residual(dense=total.to(_F32))


def _dense64(res: Residual) -> Tensor:
    if res.dense is not None:
        return res.dense.to(_F64)
    return res.left.to(_F64) @ res.right.to(_F64)


def _whitener(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``(T, R)`` with ``T @ R == I`` and ``X @ T`` (near) orthonormal, for ``gram = X^T X``."""
    scale = gram.diagonal().sqrt()
    unit = gram / scale[:, None] / scale[None, :]
    chol, info = torch.linalg.cholesky_ex(unit)
    if int(info) == 0 and float(chol.diagonal().min()) > _MIN_PIVOT:
        eye = torch.eye(unit.shape[0], dtype=_F64, device=unit.device)
        whiten = torch.linalg.solve_triangular(chol.mT, eye, upper=True)
        unwhiten = chol.mT
    else:
        lam, vecs = torch.linalg.eigh(unit)
        # Flooring keeps T invertible; the floored directions are rounding noise of X.
        root = lam.clamp_min(float(lam[-1]) * _EPS64 * unit.shape[0]).sqrt()
        whiten = vecs / root
        unwhiten = root[:, None] * vecs.mT
    return whiten / scale[:, None], unwhiten * scale[None, :]


def _right_singular_vectors(core: Tensor) -> Tensor:
    """Right singular vectors of a small matrix, by decreasing singular value, signs fixed."""
    # eigh of the Gram is ~2x faster than an SVD here; it loses accuracy only in directions
    # that are tiny, and the caller never divides by them.
    _, vecs = torch.linalg.eigh(core.mT @ core)
    return _fix_signs(vecs.flip(1))


def _dense_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s.sqrt()
    return u * root, root[:, None] * vh


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each column's largest entry positive, so outputs do not depend on LAPACK's sign choice."""
    pivot = vecs.abs().argmax(dim=0)
    signs = vecs.gather(0, pivot[None]).sign()
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
