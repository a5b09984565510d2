"""Client-level differential privacy for the aggregate update (pure math, no I/O).

Adjacency: add/remove one client's whole adapter. The released aggregate is
``sum_i w_i c_i U_i + Z`` with every client's adapter-wide update clipped to norm
C (``robust.RobustPolicy(clip_scope="adapter")``) and *fixed, public* weights w
(e.g. 1/N for a nominal N) that are not renormalised when a client is absent:
the L2 sensitivity is then ``C * max_i w_i``. Renormalising over the clients
present roughly doubles it, and replace-one adjacency doubles it too.
Outlier exclusion depends on other clients' data and is outside this analysis:
for a formal guarantee screen with clipping only.

What is clipped and noised is everything a release publishes from the clients' data: a task head
(``modules_to_save``) is part of the client's contribution. Its step against the head the release
moves, ``h_i - h_start``, is clipped *jointly* with the adapter update (one factor per client,
``min(1, C / ||(U_i, h_i - h_start)||)``) and released as ``h_start + sum_i w_i c_i (h_i - h_start) + Z``
with the modules' sigma (:func:`dp_head_release`): the sensitivity of the whole release stays ``C max w``.

Why not noise the factors: perturbing both A and B with the classic
``sqrt(2 ln(1.25/delta)) * Delta / eps`` (a) uses a formula that is only valid
for eps < 1, (b) takes the sensitivity of the *update* as if it bounded each
factor, and (c) the update becomes ``(B + Z_B)(A + Z_A)`` whose cross term
``Z_B Z_A`` is a product of two noises: its norm scales with sigma^2 and with
sqrt(d_out r d_in), giving errors 10^3 to 10^5 times the
signal at eps = 1 and N = 100..10 (benchmarks/dp_utility.py). Sound options here: dense noise
on the weight-space aggregate, or, with a frozen shared A with orthonormal rows
(FFA-LoRA), noise on B only.

Noise comes from torch's PRNG seeded from ``secrets``; floating-point sampling
is not hardened against least-significant-bit attacks (Mironov 2012).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from chorus_mq.aggregation.shapes import OutputLayout, check_options
from chorus_mq.aggregation.updates import ClientUpdate, ModuleResult, check_finite, module_dims, pad_rank
from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.factors import Residual

DEFAULT_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24,
    28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024,
)  # fmt: skip
F64 = torch.float64
_BISECT_STEPS = 200
_JSON_VERSION = 1


def _check(name: str, value: float, lo: float = 0.0, hi: float = math.inf) -> float:
    value = float(value)
    if not (lo < value < hi):
        raise ConfigError(f"{name} must be in ({lo}, {hi}), got {value!r}")
    return value


def gaussian_log_delta(epsilon: float, mu: float) -> float:
    """log of the tight delta(eps) of a Gaussian mechanism with sensitivity/sigma = mu.

    Balle & Wang 2018, Thm 8 (equivalently mu-GDP, Dong et al. 2019):
    ``delta = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``, in log space.
    """
    x = torch.tensor([mu / 2 - epsilon / mu, -mu / 2 - epsilon / mu], dtype=F64)
    log_a, log_b = (float(v) for v in torch.special.log_ndtr(x).tolist())
    log_b += epsilon
    if log_b >= log_a:  # the difference underflowed to (numerically) zero
        return -math.inf
    return log_a + math.log1p(-math.exp(log_b - log_a))


def _bisect(f: Callable[[float], bool], lo: float, hi: float, *, log_scale: bool) -> tuple[float, float]:
    """Narrow (lo, hi), f(lo) false and f(hi) true for a monotone f, to adjacent floats."""
    for _ in range(_BISECT_STEPS):
        mid = math.sqrt(lo * hi) if log_scale else (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if f(mid) else (mid, hi)
    return lo, hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest sigma making N(0, sigma^2) noise (eps, delta)-DP, valid for any eps > 0.

    Exact condition of Balle & Wang 2018, solved by bisection (the classic
    formula is invalid for eps >= 1 and loose below).
    """
    _check("epsilon", epsilon)
    log_delta = math.log(_check("delta", delta, hi=1.0))
    _check("sensitivity", sensitivity)
    hi = 1.0
    while gaussian_log_delta(epsilon, hi) <= log_delta:  # delta grows with mu = Delta/sigma
        hi *= 2.0
    lo = hi / 2.0
    while gaussian_log_delta(epsilon, lo) > log_delta:
        lo /= 2.0
    # lo is the largest mu = Delta/sigma whose delta still fits
    mu, _ = _bisect(lambda m: gaussian_log_delta(epsilon, m) > log_delta, lo, hi, log_scale=True)
    return sensitivity / mu


def gdp_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon at ``delta`` of Gaussian mechanisms composing to sensitivity/sigma = mu."""
    log_delta = math.log(_check("delta", delta, hi=1.0))
    if mu == 0.0 or gaussian_log_delta(0.0, mu) <= log_delta:
        return 0.0
    hi = 1.0
    while gaussian_log_delta(hi, mu) > log_delta:
        hi *= 2.0
    return _bisect(lambda e: gaussian_log_delta(e, mu) <= log_delta, 0.0, hi, log_scale=False)[1]


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float], sample_rate: float = 1.0) -> Tensor:
    """RDP of the (Poisson-subsampled) Gaussian mechanism at each order.

    ``alpha / (2 z^2)`` without subsampling; with sample rate q < 1 the exact
    integer-order bound of Mironov et al. 2019 (fractional orders give inf).
    """
    z = _check("noise_multiplier", noise_multiplier)
    q = float(sample_rate)
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    alphas = torch.tensor([float(a) for a in orders], dtype=F64)
    if q == 1.0:
        return alphas / (2 * z * z)
    if q == 0.0:
        return torch.zeros_like(alphas)
    out = torch.full_like(alphas, math.inf)
    for n, a in enumerate(alphas.tolist()):
        if a != int(a):
            continue
        k = torch.arange(int(a) + 1, dtype=F64)
        log_binom = math.lgamma(a + 1) - torch.lgamma(k + 1) - torch.lgamma(a - k + 1)
        terms = log_binom + k * math.log(q) + (a - k) * math.log1p(-q) + (k * k - k) / (2 * z * z)
        out[n] = torch.logsumexp(terms, 0) / (a - 1)
    return out


def rdp_to_epsilon(rdp: Sequence[float] | Tensor, orders: Sequence[float], delta: float) -> float:
    """(eps, delta) from RDP with the improved conversion (Balle et al. 2020, Canonne et al. 2020)."""
    log_delta = math.log(_check("delta", delta, hi=1.0))
    a = torch.as_tensor(orders, dtype=F64)
    eps = torch.as_tensor(rdp, dtype=F64) + torch.log1p(-1 / a) - (log_delta + torch.log(a)) / (a - 1)
    return max(float(eps.min()), 0.0)


class PrivacyAccountant:
    """Composes client-level privacy loss across rounds; JSON-serialisable.

    Tracks RDP (valid for everything) and, while no round was subsampled, the
    exact Gaussian composition ``mu^2 = sum 1/z_t^2`` (a composition of Gaussian
    mechanisms is a Gaussian mechanism), which is tight.
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        if not orders or min(orders) <= 1:
            raise ConfigError("RDP orders must be a non-empty list of numbers > 1")
        self.orders = tuple(float(a) for a in orders)
        self.rdp = torch.zeros(len(self.orders), dtype=F64)
        self.mu2 = 0.0
        self.exact = True
        self.rounds = 0

    def spend(self, noise_multiplier: float, rounds: int = 1, sample_rate: float = 1.0) -> None:
        """Record ``rounds`` releases with noise std = noise_multiplier x sensitivity."""
        if int(rounds) != rounds or rounds < 0:
            raise ConfigError(f"rounds must be a whole number >= 0, got {rounds!r}")
        cost = gaussian_rdp(noise_multiplier, self.orders, sample_rate)
        if rounds == 0:  # 0 * inf (fractional orders when subsampled) would be nan
            return
        self.rdp = self.rdp + rounds * cost
        if sample_rate < 1.0:
            self.exact = False
        self.mu2 += rounds / float(noise_multiplier) ** 2
        self.rounds += int(rounds)

    def epsilon_rdp(self, delta: float) -> float:
        """Epsilon from the composed RDP curve."""
        return rdp_to_epsilon(self.rdp, self.orders, delta)

    def epsilon(self, delta: float) -> float:
        """Tightest epsilon known at ``delta`` for everything spent so far."""
        eps = self.epsilon_rdp(delta)
        return min(eps, gdp_epsilon(math.sqrt(self.mu2), delta)) if self.exact else eps

    def to_json(self) -> dict[str, Any]:
        """A small JSON-able dict (inf RDP values stored as null)."""
        return {
            "version": _JSON_VERSION,
            "orders": list(self.orders),
            "rdp": [None if math.isinf(v) else v for v in self.rdp.tolist()],
            "mu2": self.mu2,
            "exact": self.exact,
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyAccountant:
        """Inverse of ``to_json``; ConfigError on anything malformed."""
        try:
            if data["version"] != _JSON_VERSION:
                raise ConfigError(f"unsupported privacy accountant version {data['version']!r}")
            acc = cls(data["orders"])
            rdp = torch.tensor([math.inf if v is None else float(v) for v in data["rdp"]], dtype=F64)
            acc.mu2, acc.exact, acc.rounds = float(data["mu2"]), bool(data["exact"]), int(data["rounds"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed privacy accountant state: {e!r}") from e
        if rdp.shape != acc.rdp.shape or (rdp < 0).any() or rdp.isnan().any() or acc.mu2 < 0 or acc.rounds < 0:
            raise ConfigError("malformed privacy accountant state: inconsistent values")
        acc.rdp = rdp
        return acc


def noise_for_budget(
    target_epsilon: float, delta: float, rounds: int = 1, sample_rate: float = 1.0,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:  # fmt: skip
    """Smallest noise multiplier whose ``rounds`` releases spend at most ``target_epsilon``."""
    _check("target_epsilon", target_epsilon)

    def spent(z: float) -> float:
        acc = PrivacyAccountant(orders)
        acc.spend(z, rounds, sample_rate)
        return acc.epsilon(delta)

    hi = 1.0
    while spent(hi) > target_epsilon:
        hi *= 2.0
    lo = hi / 2.0
    while lo > 1e-6 and spent(lo) <= target_epsilon:
        lo /= 2.0
    return _bisect(lambda z: spent(z) <= target_epsilon, lo, hi, log_scale=True)[1]


def aggregate_sensitivity(clip_norm: float, weights: Sequence[float]) -> float:
    """L2 sensitivity ``C * max(w)`` of ``sum w_i clip(U_i)`` under add/remove-one, weights fixed."""
    _check("clip_norm", clip_norm)
    w = [float(x) for x in weights]
    if not w or any(not (math.isfinite(x) and x >= 0) for x in w):
        raise ConfigError(f"weights must be finite numbers >= 0, got {w!r}")
    return clip_norm * max(w)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(secrets.randbits(63))


def gaussian_noise_dense(
    d_out: int, d_in: int, sigma: float, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """Dense N(0, sigma^2) noise for one module's aggregate update.

    Inherently dense: O(d_out d_in) memory and time per module, and the noised
    module's residual becomes dense. Add it to the weight-space aggregate
    (e.g. the residual), generated one module at a time.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ConfigError(f"sigma must be finite and >= 0, got {sigma!r}")
    return torch.randn(d_out, d_in, generator=_generator(generator), dtype=dtype) * sigma


def orthonormal_rows(A: Tensor, atol: float = 1e-5) -> bool:
    """True when ``A @ A.T == I`` (so ``||B A||_F == ||B||_F`` for every B)."""
    A = A.to(torch.float64)
    return A.ndim == 2 and torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=atol)


def noise_B(B: Tensor, A: Tensor, sigma: float, scaling: float, generator: torch.Generator | None = None) -> Tensor:
    """FFA-LoRA release: ``B + N(0, (sigma/scaling)^2)`` for a frozen A shared by all clients.

    With orthonormal rows, ``||s B_i A||_F = s ||B_i||_F``: clipping the update is
    clipping ``s B_i``, and noising ``s B_bar`` with sigma is the Gaussian mechanism
    on the update restricted to the row space of A; multiplying by A is
    post-processing. Noise energy: ``sigma^2 d_out r`` instead of ``sigma^2 d_out d_in``.
    """
    if not orthonormal_rows(A):
        raise ConfigError("noise_B needs a frozen A with orthonormal rows (A @ A.T = I)")
    if B.shape[1] != A.shape[0]:
        raise ConfigError(f"B {tuple(B.shape)} does not pair with A {tuple(A.shape)}")
    _check("scaling", abs(scaling))
    out_dtype = torch.promote_types(B.dtype, torch.float32)
    noise = gaussian_noise_dense(B.shape[0], B.shape[1], sigma / abs(scaling), generator, out_dtype)
    return B.to(out_dtype) + noise


def noise_generator(noise_key: str, federation: str, round_: int, module: str) -> torch.Generator:
    """Deterministic per (federation, round, module) but secret: a re-run releases the same noise,
    so a duplicate aggregation never leaves two independent noisy copies to average."""
    digest = hashlib.sha256(f"{noise_key}|{federation}|{round_}|{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def head_step(head: Tensor, base: Tensor | None) -> Tensor:
    """``h_i - h_base`` in float64: a client's step of a task head tensor (``base`` None: no head was published,
    the step is the head itself)."""
    step = head.to(F64)
    if base is None:
        return step.clone()
    if base.shape != head.shape:
        raise AggregationError(f"a head tensor of shape {tuple(head.shape)} against its base's {tuple(base.shape)}")
    return step - base.to(F64)


def adapter_clip_factor(norms_sq: Iterable[float], clip_norm: float) -> float:
    """``min(1, C / ||x||)`` with ``||x||^2`` the sum of ``norms_sq``: one factor for everything a client
    contributes (every module's update and its task head's step), so the whole contribution has norm <= C."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"the clip norm must be a finite number above 0, got {clip_norm!r}")
    norm = math.sqrt(math.fsum(float(x) for x in norms_sq))
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def dp_step_release(
    current: Tensor | None,
    steps: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sigma: float,
    generator: torch.Generator,
    lr: float = 1.0,
) -> Tensor:
    """``current + lr (sum_i w_i step_i + Z)``, Z ~ N(0, sigma^2) per element from ``generator``.

    ``steps`` are the clients' steps against their base (float64), ``weights`` their fixed public weights times
    their clip factors (never renormalised: an absent client is a zero step); ``current`` None is zeros. Summed in
    float64, one rounding at the cast (float32 at least). The noise is drawn in row-major order, the same stream
    as :func:`gaussian_noise_dense` for a matrix of this shape.
    """
    if len(steps) != len(weights):
        raise AggregationError(f"{len(steps)} steps and {len(weights)} weights: need one each")
    if not (math.isfinite(lr) and lr > 0):
        raise AggregationError(f"the server learning rate must be a finite number > 0, got {lr!r}")
    if current is None and not steps:
        raise AggregationError("a DP release needs a tensor to move or at least one step")
    shape = tuple(current.shape) if current is not None else tuple(steps[0].shape)
    total = torch.zeros(shape, dtype=F64)
    for step, w in zip(steps, weights, strict=True):
        if not (math.isfinite(w) and w >= 0):
            raise AggregationError(f"weight {w!r}: a DP release's weights must be finite and >= 0")
        if tuple(step.shape) != shape:
            raise AggregationError(f"a step of shape {tuple(step.shape)} against the release's {shape}")
        total.add_(step.to(F64), alpha=float(w))
    total += gaussian_noise_dense(1, total.numel(), sigma, generator, F64).reshape(shape)
    out_dtype = torch.float32 if current is None else torch.promote_types(current.dtype, torch.float32)
    base = torch.zeros(shape, dtype=F64) if current is None else current.to(F64)
    out = (base + total * float(lr)).to(out_dtype)
    if not torch.isfinite(out).all():
        raise AggregationError("the DP release is not finite")
    return out


def dp_head_release(
    start: Tensor | None,
    heads: Sequence[Tensor],
    bases: Sequence[Tensor | None],
    weights: Sequence[float],
    *,
    sigma: float,
    generator: torch.Generator,
    lr: float = 1.0,
) -> Tensor:
    """A task head tensor's release: ``start + lr (sum_i w_i (h_i - b_i) + Z)``.

    ``start`` is the head the release moves (None: none published, zeros), ``bases`` the head each client
    trained from (a synchronous round: ``start``; a buffered flush: its delta's base version's), ``weights``
    ``q_i c_i`` with c_i the client's joint clip factor (:func:`adapter_clip_factor` over its adapter update and
    this step), sigma the modules' (``z C / K``) and ``generator`` keyed by the head tensor's name
    (:func:`noise_generator`)."""
    if len(heads) != len(bases):
        raise AggregationError(f"{len(heads)} heads and {len(bases)} bases: need one each")
    steps = [head_step(h, b) for h, b in zip(heads, bases, strict=True)]
    return dp_step_release(start, steps, weights, sigma=sigma, generator=generator, lr=lr)


def frozen_shared_a(updates: Sequence[ClientUpdate]) -> bool:
    """Whether every client holds the same A with orthonormal rows (FFA-LoRA): noise can go on B alone."""
    first = updates[0].A
    return all(torch.equal(u.A, first) for u in updates) and orthonormal_rows(first)


def dp_layout(
    ranks: Sequence[int], d_out: int, d_in: int, *, frozen_a: bool, out_rank: int | None = None
) -> OutputLayout:
    """The shapes :func:`dp_release` returns: FFA (``frozen_a``) keeps A's rank and has no residual;
    the dense mechanism releases a rank-``out_rank`` (default: the largest rank) adapter and a dense residual."""
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise AggregationError(f"ranks must be ints >= 1, got {list(ranks)!r}")
    check_options(out_rank, torch.float32)
    if frozen_a:
        if len(set(ranks)) != 1:
            raise AggregationError(f"a frozen shared A has one rank; got ranks {sorted(set(ranks))}")
        if out_rank is not None and out_rank < ranks[0]:
            raise AggregationError(f"out_rank={out_rank} is below the frozen A's rank {ranks[0]}")
        return OutputLayout(out_rank or ranks[0], -1, "none", 0, d_out, d_in)
    return OutputLayout(out_rank or max(ranks), -1, "dense", 0, d_out, d_in)


def release_sigma(noise_multiplier: float, clip_norm: float, quorum: int) -> float:
    """``sigma = z C / K``: the noise of a release (a round or flush of quorum K) whose fixed weights are at most
    ``1 / K`` (:func:`aggregate_sensitivity`); every server-side DP release (modules, linear factors, heads) uses it."""
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 1:
        raise ConfigError(f"quorum must be a positive int, got {quorum!r}")
    return _check("noise_multiplier", noise_multiplier) * aggregate_sensitivity(clip_norm, [1.0 / quorum])


def dp_release(
    updates: Sequence[ClientUpdate],
    *,
    quorum: int,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    out_rank: int | None = None,
    frozen_a: bool | None = None,
) -> ModuleResult:
    """Release ``sum_i s_i B_i A_i / quorum + N(0, sigma^2)`` with sigma = z * C / quorum.

    The clients' updates must already be clipped (adapter-wide, to ``clip_norm``); their
    weights are ignored: the mechanism fixes 1/quorum, so an absent client is a zero update.
    When every client shares one frozen A with orthonormal rows (FFA-LoRA; ``frozen_a``:
    None detects it, True requires it), the noise goes on B alone (d_out x r) and there is
    no residual; otherwise it is dense per module (d_out x d_in) and the released adapter is
    the best rank-``out_rank`` approximation of the noised update, the rest a dense residual.
    The shapes are :func:`dp_layout`'s.
    """
    sigma = release_sigma(noise_multiplier, clip_norm, quorum)
    d_out, d_in = module_dims(updates)
    ffa = frozen_a is not False and frozen_shared_a(updates)  # checked once: it compares every client's A
    if frozen_a and not ffa:
        raise ConfigError("frozen_a=True needs every client to share one A with orthonormal rows (FFA-LoRA)")
    ranks = [int(u.A.shape[0]) for u in updates]
    layout = dp_layout(ranks, d_out, d_in, frozen_a=ffa, out_rank=out_rank)
    if ffa:
        a0 = updates[0].A.to(torch.float32)
        b_sum = torch.zeros(d_out, ranks[0], dtype=F64)
        for u in updates:
            b_sum.add_(u.B.to(F64), alpha=float(u.scaling) / quorum)
        b_out = noise_B(b_sum.to(torch.float32), a0, sigma, 1.0, generator)
        b_out, a_out = pad_rank(b_out, a0, layout.rank)
        return check_finite(ModuleResult(A=a_out.contiguous(), B=b_out.contiguous(), scaling=1.0, residual=None))
    dense = torch.zeros(d_out, d_in, dtype=F64)
    for u in updates:
        dense.addmm_(u.B.to(F64), u.A.to(F64), alpha=float(u.scaling) / quorum)
    dense += gaussian_noise_dense(d_out, d_in, sigma, generator)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    n = min(layout.rank, S.numel())
    root = S[:n].sqrt()
    left, right = (U[:, :n] * root).to(torch.float32), (root[:, None] * Vh[:n]).to(torch.float32)
    # the residual is taken against the *cast* adapter, so adapter + residual is the release
    dense.addmm_(left.to(F64), right.to(F64), alpha=-1.0)
    b_out, a_out = pad_rank(left, right, layout.rank)
    residual = Residual(dense=dense)
    return check_finite(ModuleResult(A=a_out.contiguous(), B=b_out.contiguous(), scaling=1.0, residual=residual))
