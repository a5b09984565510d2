"""Exact SVD of a factored product ``L @ diag(mid) @ R`` without forming it, and residual chaining.

The float64 Gram matrices of the factors only *precondition* the problem: the outputs
are ``L @ X`` and ``Y @ R`` with small ``X @ Y == diag(mid)`` by construction, so
``U @ V == L @ diag(mid) @ R`` to float64 rounding however badly conditioned the factors
are. Conditioning only limits how close the leading directions are to the true singular
vectors (orthogonality is lost as eps64 * cond^2, so ~1e-8 at cond 1e4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from chorus_mq.errors import AggregationError
from chorus_mq.factors import Residual

#: a direction whose weight-space norm is below RTOL times the largest one is numerically zero
RTOL = 1e-7

_F64 = torch.float64
_F32 = torch.float32
_EPS64 = torch.finfo(_F64).eps
_EPS32_UNIT = torch.finfo(_F32).eps / 2  # unit roundoff of float32
# Cholesky pivots of the unit-diagonal Gram below this mean nearly dependent columns; the
# eigen-decomposition then handles them without losing orthogonality in the others.
_MIN_PIVOT = 1e-4


def factored_svd(
    left: Tensor,
    right: Tensor,
    mid: Tensor | None = None,
    *,
    drop_after: int | None = None,
    roundoff: float = 0.0,
    top: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Singular directions of ``M = left @ diag(mid) @ right`` as balanced float64 factors.

    Returns ``(U, V)``, ``U (d_out, k)`` and ``V (k, d_in)``, sorted by decreasing singular
    value ``s_j``, with ``U[:, j] ~ u_j sqrt(s_j)``, ``V[j] ~ sqrt(s_j) v_j^T``, so that
    ``U @ V == M``. With ``drop_after=n``, directions past the first ``n`` are dropped when
    numerically zero: ``s_j <= RTOL * s_1``, or below what rounding the inputs with unit
    ``roundoff`` can change (``roundoff * sum_j |left_j| |mid_j| |right_j|``). With ``top=n``
    only the leading ``n`` of the kept directions are returned; the others are never formed,
    which saves most of the cost when ``n`` is small.
    Costs ``O((d_out + d_in) K^2 + K^3)``; when ``K`` exceeds ``min(d_out, d_in)`` the dense
    ``M`` is the smaller problem and is decomposed instead.
    """
    # Factors as rows, (k, d): Grams and products then run as row-major GEMMs, about 1.5x
    # faster than on a column-major (d, k) operand. The left output is a transposed view.
    lt, rf = left.mT.to(_F64).contiguous(), right.to(_F64).contiguous()
    k_in, d_out = lt.shape
    d_in = rf.shape[1]
    mid = torch.ones(k_in, dtype=_F64, device=lt.device) if mid is None else mid.to(_F64)
    if k_in > min(d_out, d_in):
        weight = lt.norm(dim=1) * rf.norm(dim=1) * mid.abs()
        u, sigma, vh = torch.linalg.svd((lt.mT * mid) @ rf, full_matrices=False)
        idx = _significant(sigma, drop_after, roundoff * float(weight.sum()))[:top]
        root = sigma[idx].sqrt()
        return u[:, idx] * root, root[:, None] * vh[idx]
    basis = _whitened(lt, rf, mid)
    if basis is None:
        return lt.new_zeros(0, d_out).mT, rf.new_zeros(0, d_in)
    vecs = _right_singular_vectors(basis.core, top)
    scaled = basis.core @ vecs  # columns u_j * s_j in the whitened basis
    sigma = scaled.norm(dim=0)
    # Select in the small space: the whitened bases are orthonormal, so s_j is the norm.
    idx = _significant(sigma, drop_after, roundoff * basis.weight_sum)
    small_l, small_r = basis.directions(scaled[:, idx], vecs[:, idx], sigma[idx])
    return (small_l @ lt).mT, small_r @ rf


@dataclass
class SvdSplit:
    """``M`` as its best rank-n adapter plus the rest, all float64: ``M == B @ A + left @ right``.

    ``B (d_out, n)`` and ``A (n, d_in)`` are balanced singular directions (``n <= rank``; fewer
    when ``M`` has fewer); ``left (d_out, m)`` and ``right (m, d_in)`` hold the ``m`` discarded
    directions, at most ``min(K, d_out, d_in) - rank`` of them (None when not asked for).
    """

    B: Tensor
    A: Tensor
    left: Tensor | None
    right: Tensor | None


def split_svd(b_rows: Tensor, a_rows: Tensor, mid: Tensor, rank: int, *, residual: bool = True) -> SvdSplit:
    """The rank-``rank`` truncation of ``M = b_rows^T diag(mid) a_rows`` and, if asked, what it leaves out.

    ``b_rows (K, d_out)`` and ``a_rows (K, d_in)`` are float64 factors as rows. The residual
    comes from the whitened K x K core, never from the dense ``M`` (unless ``K`` exceeds
    ``min(d_out, d_in)``): on the larger side it is written against ``K - rank`` of the input
    rows themselves (pivoted elimination of ``rank`` others), so only the smaller side pays a
    ``d x K x (K - rank)`` product. B-side results are transposed views of rows.
    """
    d_out, d_in = b_rows.shape[1], a_rows.shape[1]
    if b_rows.shape[0] > min(d_out, d_in):
        return _split_dense(b_rows, a_rows, mid, rank, residual=residual)
    if d_out <= d_in:
        u, v, p, q = _split_rows(b_rows, a_rows, mid, rank, residual=residual)
        return SvdSplit(u.mT, v, None if p is None else p.mT, q)
    # M^T = a_rows^T diag(mid) b_rows: the same problem with the sides swapped
    u, v, p, q = _split_rows(a_rows, b_rows, mid, rank, residual=residual)
    return SvdSplit(v.mT, u, None if q is None else q.mT, p)


def _split_rows(
    first: Tensor, second: Tensor, mid: Tensor, rank: int, *, residual: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``M = first^T diag(mid) second == u^T v + p^T q`` (all rows), eliminating on the second side."""
    k_in, d_first, d_second = first.shape[0], first.shape[1], second.shape[1]
    basis = _whitened(first, second, mid)
    if basis is None:
        u, v = first.new_zeros(0, d_first), second.new_zeros(0, d_second)
        return (u, v, u, v) if residual else (u, v, None, None)
    core = basis.core
    vecs = _right_singular_vectors(core)
    scaled = core @ vecs
    sigma = scaled.norm(dim=0)
    n = min(rank, sigma.numel())
    small_u, small_v = basis.directions(scaled[:, :n], vecs[:, :n], sigma[:n])
    v = small_v @ second
    m = sigma.numel() - rank
    if not residual:
        return small_u @ first, v, None, None
    if m <= 0:
        return small_u @ first, v, first.new_zeros(0, d_first), second.new_zeros(0, d_second)
    # The residual is first^T Z second with Z = whiten_l (core Y_res)(Y_res^T) whiten_r^T, which
    # vanishes on N = unwhiten_r^T Y_kept: Z N = 0. Pivoted LU picks `rank` rows Jc of N with a
    # well-conditioned block, and Z[:, Jc] = Z[:, J] E with E = -N[J] N[Jc]^-1 (|entries| small),
    # so Z @ second == Z[:, J] @ (second[J] + E @ second[Jc]): m input rows plus a rank-r update.
    null = basis.unwhiten_r.mT @ vecs[:, :rank]
    perm_matrix, low, _ = torch.linalg.lu(null)
    perm = perm_matrix.argmax(dim=0)
    jc, j = basis.live[perm[:rank]], perm[rank:]
    elim = -torch.linalg.solve_triangular(low[:rank], low[rank:], upper=False, left=False, unitriangular=True)
    z_j = basis.whiten_l @ scaled[:, rank:] @ (basis.whiten_r[j] @ vecs[:, rank:]).mT  # (k_live, m)
    q = second.index_select(0, basis.live[j]).addmm_(elim, second.index_select(0, jc))
    # one product for the adapter's and the residual's first-side factors (row-major operands:
    # a transposed operand here runs 2-3x slower)
    coeffs = torch.cat([small_u, _spread(z_j.mT.contiguous(), basis.live, k_in)], 0)
    out = coeffs @ first
    return out[:n], v, out[n:], q


def _split_dense(b_rows: Tensor, a_rows: Tensor, mid: Tensor, rank: int, *, residual: bool) -> SvdSplit:
    """:func:`split_svd` through the dense ``M``, when it is the smaller problem."""
    u, sigma, vh = torch.linalg.svd((b_rows.mT * mid) @ a_rows, full_matrices=False)
    root = sigma.sqrt()
    n = min(rank, sigma.numel())
    b, a = u[:, :n] * root[:n], root[:n, None] * vh[:n]
    if not residual:
        return SvdSplit(b, a, None, None)
    return SvdSplit(b, a, u[:, n:] * root[n:], root[n:, None] * vh[n:])


@dataclass
class _Basis:
    """Whitened bases of both factors' live columns and the small core between them.

    ``first^T diag(mid) second == (first^T W_l) core (W_r^T second)`` restricted to the live
    columns, with ``W_l = whiten_l``, ``core = unwhiten_l diag(mid) unwhiten_r^T``.
    """

    live: Tensor
    k_in: int
    whiten_l: Tensor
    unwhiten_l: Tensor
    whiten_r: Tensor
    unwhiten_r: Tensor
    core: Tensor
    weight_sum: float

    def directions(self, scaled: Tensor, vecs: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Balanced ``(k, K)`` coefficients of the chosen directions on each side, dead columns zero."""
        root = sigma.sqrt()
        small_l = (scaled / torch.where(root > 0, root, torch.ones_like(root))).mT @ self.whiten_l.mT
        small_r = (root[:, None] * vecs.mT) @ self.whiten_r.mT
        return _spread(small_l, self.live, self.k_in), _spread(small_r, self.live, self.k_in)


def _whitened(lt: Tensor, rf: Tensor, mid: Tensor) -> _Basis | None:
    """The whitened problem of ``lt^T diag(mid) rf`` (factors as rows); None when it is exactly zero."""
    k_in = lt.shape[0]
    gram_l, gram_r = lt @ lt.mT, rf @ rf.mT
    weight = (gram_l.diagonal() * gram_r.diagonal()).sqrt() * mid.abs()
    # Columns that contribute nothing are removed exactly; they would make the Grams singular.
    live = (weight > 0).nonzero().squeeze(1)
    if live.numel() == 0:
        return None
    if live.numel() < k_in:
        gram_l, gram_r, mid = gram_l[live][:, live], gram_r[live][:, live], mid[live]
    (whiten_l, unwhiten_l), (whiten_r, unwhiten_r) = _whiteners(gram_l, gram_r)
    core = unwhiten_l @ (mid[:, None] * unwhiten_r.mT)
    return _Basis(live, k_in, whiten_l, unwhiten_l, whiten_r, unwhiten_r, core, float(weight.sum()))


def _spread(small: Tensor, live: Tensor, k_in: int) -> Tensor:
    """``small``'s columns placed at the ``live`` ones of ``k_in``, zeros elsewhere."""
    if live.numel() == k_in:
        return small
    out = small.new_zeros(small.shape[0], k_in)
    out[:, live] = small
    return out


def compress(left: Tensor, right: Tensor) -> Residual | None:
    """``left @ right`` re-compressed exactly: only numerically zero directions are dropped.

    The factors are taken as float32-rounded, so directions smaller than that rounding
    can change are zero too.
    """
    return Residual.from_factors(*factored_svd(left, right, drop_after=0, roundoff=_EPS32_UNIT))


def chain_residuals(prev: Residual | None, new: Residual | None) -> Residual | None:
    """The sum of two residuals, re-compressed exactly (dense when that is smaller).

    A dense operand makes the sum dense. None stands for a zero residual.
    """
    if prev is None or new is None:
        return new if prev is None else prev
    if prev.shape != new.shape:
        raise AggregationError(f"cannot chain residuals of shapes {prev.shape} and {new.shape}")
    if prev.dense is None and new.dense is None:
        (l1, r1), (l2, r2) = prev.factors(), new.factors()
        return compress(torch.cat([l1, l2], 1), torch.cat([r1, r2], 0))
    total = _dense64(prev) + _dense64(new)
    if not bool(total.any()):
        return None
    return Residual(dense=total.to(_F32))


def _dense64(res: Residual) -> Tensor:
    if res.dense is not None:
        return res.dense.to(_F64)
    left, right = res.factors()
    return left.to(_F64) @ right.to(_F64)


def _significant(sigma: Tensor, drop_after: int | None, floor: float) -> Tensor:
    """Indices of the directions to keep: all of the first ``drop_after``, then those above the floor."""
    idx = torch.arange(sigma.numel(), device=sigma.device)
    if drop_after is None or sigma.numel() == 0:
        return idx
    keep = (sigma > max(RTOL * float(sigma.max()), floor)) | (idx < drop_after)
    return idx[keep]


def _whiteners(*grams: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(T, R)`` per ``gram = X^T X``, with ``T @ R == I`` and ``X @ T`` (near) orthonormal."""
    scales = [g.diagonal().sqrt() for g in grams]
    units = torch.stack([g / sc[:, None] / sc[None, :] for g, sc in zip(grams, scales, strict=True)])
    # One batched Cholesky for all (the common, well-conditioned case).
    chol, info = torch.linalg.cholesky_ex(units)
    pivots = chol.diagonal(dim1=-2, dim2=-1).amin(dim=-1)
    good = (info == 0) & (pivots > _MIN_PIVOT)
    eye = torch.eye(units.shape[-1], dtype=_F64, device=units.device).expand_as(units)
    whiten_all = torch.linalg.solve_triangular(chol.mT, eye, upper=True) if bool(good.all()) else None
    out = []
    for i, (unit, scale) in enumerate(zip(units, scales, strict=True)):
        if whiten_all is not None:
            whiten, unwhiten = whiten_all[i], chol[i].mT
        elif bool(good[i]):
            whiten, unwhiten = torch.linalg.solve_triangular(chol[i].mT, eye[i], upper=True), chol[i].mT
        else:
            whiten, unwhiten = _eigen_whitener(unit)
        out.append((whiten / scale[:, None], unwhiten * scale[None, :]))
    return out


def _eigen_whitener(unit: Tensor) -> tuple[Tensor, Tensor]:
    """The whitener of a nearly singular unit-diagonal Gram, from its eigen-decomposition."""
    lam, vecs = torch.linalg.eigh(unit)
    # Flooring keeps T invertible; the floored directions are rounding noise of X.
    root = lam.clamp_min(float(lam[-1]) * _EPS64 * unit.shape[0]).sqrt()
    return vecs / root, root[:, None] * vecs.mT


def _right_singular_vectors(core: Tensor, top: int | None = None) -> Tensor:
    """The ``top`` (default all) leading right singular vectors of a small matrix, signs fixed."""
    # eigh of the Gram is ~2x faster than an SVD here. It is inaccurate only in tiny
    # directions, and exactness needs nothing but an orthogonal W (C W W^T == C).
    _, vecs = torch.linalg.eigh(core.mT @ core)
    return _fix_signs(vecs.flip(1)[:, :top])


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each column's largest entry positive, so outputs do not depend on LAPACK's sign choice."""
    pivot = vecs.abs().argmax(dim=0)
    signs = vecs.gather(0, pivot[None]).sign()
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
