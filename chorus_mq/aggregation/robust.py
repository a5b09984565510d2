"""Byzantine-robust screening of factored LoRA updates (pure tensor math, no I/O).

Every statistic is taken on the real update ``U_i = s_i B_i A_i`` (d_out x d_in)
without forming it: ``<U_i, U_j>_F = s_i s_j sum((B_iᵀ B_j) * (A_i A_jᵀ))`` costs
``O((d_out + d_in) r_i r_j)`` and is computed in float64. A round is summarised
by the N x N Gram matrix of the clients' adapter-wide updates (the sum of the
per-module Grams). Norms, pairwise distances, distances to any combination
``sum_k alpha_k U_k``, clipping (a diagonal rescaling of the Gram) and the
geometric median (Weiszfeld on the coefficients alpha) all follow from it, so a
robust aggregate is always a *reweighting* of the clients that the exact engine
then aggregates factored.

What each piece guarantees:

* non-finite (NaN/Inf) or malformed clients are excluded before any statistic,
  so one poisoned client cannot disable the defences;
* clipping: after it every kept client's adapter-wide (or per-module) update has
  Frobenius norm <= C, hence moves a weighted mean by at most ``w_i * C``;
* outlier tests (median/MAD robust z on log norms and on log distances to the
  geometric median): tolerate up to half the clients being arbitrary; they can
  fire at any N >= 3 (the classic z-score cannot exceed (n-1)/sqrt(n));
  they are heuristics, not a bound;
* ``geomedian``: breakdown point 1/2. If attackers hold less than half the
  weight, the result stays within a constant factor of the honest clients'
  spread around their centre however large the attack (Minsker 2015, Lemma 2.1);
* ``trimmed``: the k clients farthest from the geometric median are dropped; the
  result lies within the largest remaining distance of that median (convexity).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import torch
from torch import Tensor

from chorus_mq.aggregation.updates import ClientUpdate
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import RobustAggregate

F64 = torch.float64
#: modified z-score constant: 0.6745 = Phi^-1(3/4), makes MAD consistent for a normal
_MAD_K = 0.6745
#: Gram-derived distances carry ~sqrt(machine eps) relative noise; below this
#: fraction of the median norm two updates are taken to coincide
_POINT_TOL = 1e-7
#: bounds the K x K Gram block held at once (K = summed ranks of a client chunk)
_CHUNK_RANK = 2048
CLIP_SCOPES = ("adapter", "module")

#: one client's update of one module: a :class:`ClientUpdate`, or its ``(A, B, scaling)``
FactoredUpdate: TypeAlias = ClientUpdate | tuple[Tensor, Tensor, float]
_Update = TypeVar("_Update", ClientUpdate, tuple[Tensor, Tensor, float])


def _factors(u: FactoredUpdate) -> tuple[Tensor, Tensor, float]:
    """(A, B, scaling) of a ClientUpdate or an (A, B, scaling) tuple."""
    A, B, s = (u[0], u[1], u[2]) if isinstance(u, (tuple, list)) else (u.A, u.B, u.scaling)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError(
            f"LoRA factors do not pair: A {tuple(A.shape)}, B {tuple(B.shape)}; expected A (r, d_in) and B (d_out, r)"
        )
    return A, B, float(s)


def is_finite_update(u: FactoredUpdate) -> bool:
    """True when the factors and the scaling hold no NaN/Inf."""
    A, B, s = _factors(u)
    return math.isfinite(s) and bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())


def gram_matrix(updates: Sequence[FactoredUpdate]) -> Tensor:
    """float64 N x N matrix of ``<U_i, U_j>_F`` for one module, never forming U_i."""
    fs = [_factors(u) for u in updates]
    shapes = {(B.shape[0], A.shape[1]) for A, B, _ in fs}
    if len(shapes) > 1:
        raise ConfigError(f"updates of one module disagree on (d_out, d_in): {sorted(shapes)}")
    # Clients are processed in chunks so the (K x K) blocks stay bounded; within a
    # chunk one product of the concatenated factors yields every r_i x r_j block.
    n = len(fs)
    step = max(1, _CHUNK_RANK // max([A.shape[0] for A, _, _ in fs] + [1]))
    packed = [_pack(fs[i : i + step], slice(i, min(i + step, n))) for i in range(0, n, step)]
    G = torch.zeros(n, n, dtype=F64)
    for ci, (si, Bi, Ai, own_i) in enumerate(packed):
        for sj, Bj, Aj, own_j in packed[ci:]:
            H = (Bi.T @ Bj) * (Ai @ Aj.T)
            rows = torch.zeros(si.stop - si.start, H.shape[1], dtype=F64).index_add_(0, own_i, H)
            block = torch.zeros(si.stop - si.start, sj.stop - sj.start, dtype=F64).index_add_(1, own_j, rows)
            G[si, sj], G[sj, si] = block, block.T
    s = torch.tensor([f[2] for f in fs], dtype=F64)
    return G * torch.outer(s, s)


def _pack(chunk: Sequence[tuple[Tensor, Tensor, float]], where: slice) -> tuple[slice, Tensor, Tensor, Tensor]:
    B = torch.cat([B.to(F64) for _, B, _ in chunk], dim=1)
    A = torch.cat([A.to(F64) for A, _, _ in chunk], dim=0)
    ranks = torch.tensor([A.shape[0] for A, _, _ in chunk])
    return where, B, A, torch.repeat_interleave(torch.arange(len(chunk)), ranks)


def pairwise_distances(gram: Tensor) -> Tensor:
    """``||U_i - U_j||_F`` for all pairs, from the Gram matrix."""
    d = torch.diagonal(gram)
    d2 = (d[:, None] + d[None, :] - 2 * gram).clamp_min(0.0)
    return d2.sqrt().fill_diagonal_(0.0)


def distances_to(gram: Tensor, alpha: Tensor) -> Tensor:
    """``||U_i - sum_k alpha_k U_k||_F`` for every i, from the Gram matrix."""
    ga = gram @ alpha
    return (torch.diagonal(gram) - 2 * ga + alpha @ ga).clamp_min(0.0).sqrt()


def _sq_norm(u: FactoredUpdate) -> float:
    A, B, s = _factors(u)
    A, B = A.to(F64), B.to(F64)
    return max(s * s * ((B.T @ B) * (A @ A.T)).sum().item(), 0.0)


def update_distance(u: FactoredUpdate, v: FactoredUpdate) -> float:
    """``||U_u - U_v||_F`` of two (A, B, scaling) updates, from the Gram of [B_u|B_v], [A_u;A_v]."""
    return pairwise_distances(gram_matrix([u, v]))[0, 1].item()


def robust_z(x: Tensor, min_spread: float = 0.0) -> Tensor:
    """Modified z-scores ``0.6745 (x - median) / max(MAD, min_spread)``.

    When the scale is 0 (more than half the values equal), any value off the
    median scores +-inf: a strict majority agreeing exactly makes it an outlier.
    """
    x = x.to(F64)
    med = torch.quantile(x, 0.5)  # interpolated; torch.median picks the lower middle
    dev = x - med
    scale = max(float(torch.quantile(dev.abs(), 0.5)), min_spread)
    if scale > 0:
        return _MAD_K * dev / scale
    return torch.where(dev == 0, torch.zeros_like(dev), dev.sign() * math.inf)


def geometric_median(gram: Tensor, weights: Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Convex coefficients alpha of the weighted geometric median ``sum_k alpha_k U_k``.

    Weiszfeld iterations with the Vardi-Zhang step at data points, started at the
    weighted medoid; clients of weight 0 get alpha 0. The median of the updates is
    a reweighting of them, so it stays low-rank and exactly aggregable.
    """
    w = weights.to(F64) / weights.sum()
    live = w > 0
    norms = torch.diagonal(gram).clamp_min(0).sqrt()[live]
    ref = float(norms.median()) or float(norms.max())
    if ref == 0.0:  # every update is zero: any combination is the median
        return w
    medoid = torch.where(live, pairwise_distances(gram) @ w, torch.full_like(w, math.inf)).argmin()
    alpha = torch.zeros_like(w)
    alpha[medoid] = 1.0
    for _ in range(max_iter):
        d = distances_to(gram, alpha)
        at = live & (d <= _POINT_TOL * ref)
        c = torch.where(live & ~at, w / d.clamp_min(_POINT_TOL * ref), torch.zeros_like(w))
        if c.sum() == 0:  # all weight sits on the current point
            break
        step = c / c.sum() - alpha
        pull = float(c.sum()) * math.sqrt(max(float(step @ gram @ step), 0.0))
        # Vardi-Zhang: at a data point of weight eta, move only if the others pull harder
        lam = min(1.0, float(w[at].sum()) / pull) if pull > 0 else 1.0
        new = alpha + (1.0 - lam) * step
        moved = math.sqrt(max(float((new - alpha) @ gram @ (new - alpha)), 0.0))
        alpha = new
        if moved <= tol * ref:
            break
    return alpha


@dataclass(frozen=True)
class RobustPolicy:
    """How a round is screened. Defaults: detect outliers, no clipping, weighted mean."""

    detect_outliers: bool = True
    z_threshold: float = 3.5
    #: floor of the MAD of log norms / log distances. Honest distances concentrate
    #: in high dimension, so at small N the MAD can be tiny by chance; with the floor
    #: a client within ``exp(z_threshold / 0.6745 * min_spread)`` (x1.3) of the
    #: median never flags
    min_spread: float = 0.05
    clip_norm: float | None = None
    clip_scope: str = "adapter"
    aggregate: str = "mean"
    trim: int = 0
    max_iter: int = 200

    def __post_init__(self) -> None:
        if not self.z_threshold > 0 or not self.min_spread >= 0:
            raise ConfigError("z_threshold must be > 0 and min_spread >= 0")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"clip_norm must be a positive finite number, got {self.clip_norm!r}")
        if self.clip_scope not in CLIP_SCOPES:
            raise ConfigError(f"clip_scope must be one of {CLIP_SCOPES}, got {self.clip_scope!r}")
        if self.aggregate not in RobustAggregate.values():
            choices = ", ".join(RobustAggregate.values())
            raise ConfigError(f"aggregate must be one of {choices}, got {self.aggregate!r}")
        if self.trim < 0 or (self.trim and self.aggregate != "trimmed"):
            raise ConfigError("trim must be >= 0 and is only used with aggregate='trimmed'")


@dataclass
class ScreenResult:
    """Outcome of screening one round.

    Give the engine only the ``kept`` clients (it validates every update it gets),
    with ``weights[i]`` (sum 1, 0 when excluded) as client i's weight and client
    i's module m scaled by ``clip_factors[i, m]`` through ``clip_update`` (B only).
    """

    weights: Tensor
    excluded: dict[int, str]
    clip_factors: Tensor
    modules: list[str]
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [i for i in range(len(self.weights)) if i not in self.excluded]


def clip_update(u: _Update, factor: float) -> _Update:
    """The same update with B scaled by ``factor``: the update scales linearly."""
    if isinstance(u, ClientUpdate):
        return dataclasses.replace(u, B=u.B * factor)
    A, B, s = u
    return (A, B * factor, s)


class GramAccumulator:
    """Ingests a round one module at a time, keeping only what ``policy`` needs, then screens it.

    Holds M x N squared norms; the N x N Gram only when the policy needs distances
    (outlier tests, geomedian, trimmed: O(N^2 r^2 (d_out + d_in)) per module), and
    one per module only for per-module clipping. Never more than one module's factors.
    """

    def __init__(self, n_clients: int, policy: RobustPolicy | None = None):
        if n_clients < 1:
            raise ConfigError("a round needs at least one client")
        self.n = n_clients
        self.policy = policy or RobustPolicy()
        self.pairwise = self.policy.detect_outliers or self.policy.aggregate != "mean"
        self.modules: list[str] = []
        self.excluded: dict[int, str] = {}
        self._sq: list[Tensor] = []
        per_module_clip = self.policy.clip_norm is not None and self.policy.clip_scope == "module"
        self._per_module = self.pairwise and per_module_clip
        self._grams: list[Tensor] = []  # per module, only for per-module clipping
        self._gram = torch.zeros(self.n, self.n, dtype=F64) if self.pairwise and not per_module_clip else None

    def add(self, name: str, updates: Sequence[FactoredUpdate | None]) -> None:
        """Add one module's updates (one per client; None = client lacks the module)."""
        if len(updates) != self.n:
            raise ConfigError(f"module {name!r}: {len(updates)} updates for {self.n} clients")
        shapes: dict[int, tuple[int, int]] = {}
        for i, u in enumerate(updates):
            if i in self.excluded:
                continue
            try:
                if u is None:
                    raise ConfigError("module missing")
                if not is_finite_update(u):
                    raise ConfigError("non-finite values (NaN/Inf)")
            except ConfigError as e:
                self.excluded[i] = f"module {name!r}: {e}"
                continue
            A, B, _ = _factors(u)
            shapes[i] = (B.shape[0], A.shape[1])
        # One malformed client must not stop the round: the shape most clients agree on wins.
        common = Counter(shapes.values()).most_common(1)
        for i, shp in shapes.items():
            if shp != common[0][0]:
                self.excluded[i] = f"module {name!r}: shape {shp} differs from the round's {common[0][0]}"
        # every client not excluded sent the module (a missing one was excluded above)
        live = {i: u for i, u in enumerate(updates) if u is not None and i not in self.excluded}
        ok = sorted(live)
        sq = torch.zeros(self.n, dtype=F64)
        if self.pairwise:
            g = torch.zeros(self.n, self.n, dtype=F64)
            if ok:
                idx = torch.tensor(ok)
                g[idx[:, None], idx[None, :]] = gram_matrix([live[i] for i in ok])
            sq = torch.diagonal(g).clone()
            if self._per_module:
                self._grams.append(g)
            elif self._gram is not None:
                self._gram += g
        elif ok:
            sq[ok] = torch.tensor([_sq_norm(live[i]) for i in ok], dtype=F64)
        self.modules.append(name)
        self._sq.append(sq)

    def screen(self, weights: Sequence[float] | None = None) -> ScreenResult:
        """Exclude, clip and reweight the clients as the policy says."""
        policy = self.policy
        base = _base_weights(weights, self.n)
        excluded = dict(self.excluded)
        live = torch.tensor([i not in excluded for i in range(self.n)]) & (base > 0)
        # masking drops the earlier modules of clients excluded at a later one
        sq = torch.stack(self._sq) * live if self._sq else torch.zeros(1, self.n, dtype=F64)
        module_norms = sq.sqrt()
        norms = sq.sum(0).sqrt()
        stats = {"norm": torch.where(live, norms, math.nan), "module_norm": module_norms.T.clone()}
        clip = _clip_factors(module_norms, norms, policy)
        if self.pairwise:
            mask = live[:, None] & live[None, :]
            if self._per_module:
                G = torch.stack(self._grams).sum(0) * mask
                Gc = torch.stack([g * torch.outer(c, c) for g, c in zip(self._grams, clip, strict=True)]).sum(0) * mask
            else:  # adapter-wide (or no) clipping: one factor per client in every module
                assert self._gram is not None  # allocated for exactly this case
                G = self._gram * mask
                Gc = G * torch.outer(clip[0], clip[0])
        if policy.detect_outliers and int(live.sum()) >= 3:
            _detect(G, norms, base * live, policy, excluded=excluded, stats=stats)
        keep = torch.tensor([i not in excluded for i in range(self.n)]) & (base > 0)
        if not keep.any():
            detail = "; ".join(f"client {i}: {r}" for i, r in sorted(excluded.items())[:5])
            raise AggregationError(f"no client passed screening ({len(excluded)} excluded): {detail}")
        w = base * keep
        if policy.aggregate == "trimmed":
            w = _trim(Gc, w, policy, excluded)
        elif policy.aggregate == "geomedian":
            w = geometric_median(Gc, w, max_iter=policy.max_iter)
        return ScreenResult(w / w.sum(), excluded, clip.T.clone(), list(self.modules), stats)


def screen(
    clients: Sequence[Sequence[FactoredUpdate] | Mapping[str, FactoredUpdate]],
    policy: RobustPolicy | None = None,
    weights: Sequence[float] | None = None,
) -> ScreenResult:
    """Screen a round given each client's modules (a list aligned by position, or a name->update map)."""
    acc = GramAccumulator(len(clients), policy)
    maps = [c for c in clients if isinstance(c, Mapping)]
    if clients and len(maps) == len(clients):
        for name in sorted(set().union(*(c.keys() for c in maps))):
            acc.add(name, [c.get(name) for c in maps])
        return acc.screen(weights)
    lists = [c for c in clients if not isinstance(c, Mapping)]
    if len(lists) != len(clients):
        raise ConfigError("clients must all be name -> update maps, or all lists aligned by position")
    n_mod = {len(c) for c in lists}
    if len(n_mod) != 1:
        raise ConfigError(f"clients hold different numbers of modules: {sorted(n_mod)}")
    for m in range(n_mod.pop()):
        acc.add(str(m), [c[m] for c in lists])
    return acc.screen(weights)


def _base_weights(weights: Sequence[float] | None, n: int) -> Tensor:
    if weights is None:
        return torch.ones(n, dtype=F64)
    w = torch.as_tensor(list(weights), dtype=F64)
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError(f"weights must be {n} finite numbers >= 0, got {list(weights)!r}")
    return w


def _log_floor(x: Tensor, ref: float) -> Tensor:
    # Values below a tiny fraction of the typical norm are noise (or exact zeros);
    # flooring keeps the logs finite while a zero update still sits far below the rest.
    return torch.log(x.clamp_min(_POINT_TOL * ref if ref > 0 else 1e-300))


def _detect(
    G: Tensor, norms: Tensor, w: Tensor, policy: RobustPolicy, *, excluded: dict[int, str], stats: dict[str, Tensor]
) -> None:
    live = w > 0
    ref = float(norms[live].median()) or float(norms[live].max())
    dist = distances_to(G, geometric_median(G, w, max_iter=policy.max_iter))
    zn, zd = torch.full_like(norms, math.nan), torch.full_like(norms, math.nan)
    # Log scale: scaling attacks are multiplicative, and a zero update scores far low.
    zn[live] = robust_z(_log_floor(norms[live], ref), policy.min_spread)
    zd[live] = robust_z(_log_floor(dist[live], ref), policy.min_spread)
    stats.update(norm_z=zn, centre_distance=torch.where(live, dist, math.nan), distance_z=zd)
    for i in torch.nonzero(live).flatten().tolist():
        if abs(zn[i]) > policy.z_threshold:  # two-sided: boosted and free-riding (near-zero) updates
            excluded[i] = f"update norm {norms[i].item():.4g} is an outlier (z {zn[i].item():+.1f})"
        elif zd[i] > policy.z_threshold:  # one-sided: being close to the centre is fine
            excluded[i] = f"distance {dist[i].item():.4g} to the geometric median is an outlier (z {zd[i].item():+.1f})"


def _clip_factors(module_norms: Tensor, norms: Tensor, policy: RobustPolicy) -> Tensor:
    """(M, N) factors min(1, C / ||U||), adapter-wide (same for every module) or per module."""
    if policy.clip_norm is None:
        return torch.ones_like(module_norms)
    ref = norms[None, :] if policy.clip_scope == "adapter" else module_norms
    return (policy.clip_norm / ref).clamp(max=1.0).expand_as(module_norms).clone()


def _trim(Gc: Tensor, w: Tensor, policy: RobustPolicy, excluded: dict[int, str]) -> Tensor:
    kept = torch.nonzero(w > 0).flatten().tolist()
    if policy.trim >= len(kept):
        raise AggregationError(f"cannot trim {policy.trim} of {len(kept)} remaining clients")
    dist = distances_to(Gc, geometric_median(Gc, w, max_iter=policy.max_iter))
    w = w.clone()
    for i in sorted(kept, key=lambda i: -dist[i].item())[: policy.trim]:
        excluded[i] = f"trimmed: distance {dist[i].item():.4g} to the geometric median among the {policy.trim} largest"
        w[i] = 0.0
    return w


#: default k of :func:`relative_clip_factors`: no client's update counts for more than 10x the
#: round's median client (per module and adapter-wide)
RELATIVE_CLIP = 10.0


def lower_median(values: Tensor) -> float:
    """The lower middle value (the smaller of the two middles for an even count; NaN when empty).

    With two clients it is the smaller norm: one client alone never sets the scale.
    """
    if values.numel() == 0:
        return math.nan
    return float(values.sort().values[(values.numel() - 1) // 2])


def relative_clip_factors(module_norms: Tensor, k: float) -> Tensor:
    """(M, N) factors ``min(1, k med_m / |U_im|, k med / |U_i|)`` that cap every client relative to the round.

    ``module_norms[m, i]`` is ``||s B A||_F`` of client i's module m, NaN where the client did
    not send it. ``med_m`` is the lower median over the clients that sent module m, ``med`` the
    lower median of the adapter-wide norms ``|U_i|`` (over the modules each sent). After
    clipping no client's module update exceeds ``k`` times the module's median and no client's
    whole update ``k`` times the round's median, so with weights capped at ``w`` the published
    update is at most ``(1 - w + w k)`` times the largest honest client's while fewer than half
    the clients are outliers. A client already within both bounds keeps factor exactly 1.0: a
    round where nobody exceeds ``k`` times the median is unchanged. A zero median (most clients
    sent zero) carries no scale and clips nothing.
    """
    if not (math.isfinite(k) and k >= 1):
        raise ConfigError(f"the relative clip k must be a finite number >= 1, got {k!r}")
    norms = module_norms.to(F64)
    present = ~torch.isnan(norms)
    factors = torch.ones_like(norms)
    whole = torch.where(present, norms, torch.zeros_like(norms)).square().sum(0).sqrt()
    sent = present.any(0)
    caps = [(whole, lower_median(whole[sent]), sent)]
    for m in range(norms.shape[0]):
        caps.append((norms[m], lower_median(norms[m][present[m]]), present[m]))
    for i, (values, med, mask) in enumerate(caps):
        if not med > 0:
            continue
        cap = torch.where(mask & (values > k * med), (k * med) / values, torch.ones_like(values))
        if i == 0:
            factors = torch.minimum(factors, cap[None, :].expand_as(factors))
        else:
            factors[i - 1] = torch.minimum(factors[i - 1], cap)
    return factors
