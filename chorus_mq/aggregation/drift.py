"""How far each client's update points from the round's aggregate (pure tensor math, no I/O).

A client's update of a module is ``U_i = s_i B_i A_i`` and the round's exact aggregate is
``G = Σ w_i U_i / (Σ w_i + absent)`` (the weights and absent mass the engine normalises by).
Inner products never form a dense matrix: ``<U_i, U_j>_F = s_i s_j sum((B_iᵀ B_j) ∘ (A_i A_jᵀ))``
(``robust.gram_matrix``, float64), so ``<U_i, G> = (Gram w)_i / W`` and ``‖G‖² = wᵀ Gram w / W²``.
That costs N² r² (d_out + d_in): at N = 100 on 70B shapes, most of a round. Where every client's A
is the same matrix (ffa-lora; rolora's B rounds), ``G = B̄ A`` with ``B̄ = Σ w_i s_i B_i / W``, and
``<U_i, G> = s_i <B_i, B̄ A Aᵀ>``: N r d_out for the inner products and N r² d_out for the norms, the Gram never
formed (likewise a shared B).

Over an adapter the updates are vectors of all their modules, so a client's cosine is the sum
of its per-module inner products over the product of the summed squared norms; a module a client
did not send is a zero block of its vector. The per-module parts are additive, so shards sum them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from chorus_mq.aggregation.robust import gram_matrix
from chorus_mq.aggregation.updates import ClientUpdate
from chorus_mq.errors import AggregationError

_F64 = torch.float64


@dataclass(frozen=True)
class ModuleAlignment:
    """One module's contribution: per client ``<U_i, G>`` and ``‖U_i‖²``, and ``‖G‖²``."""

    dots: tuple[float, ...]
    norms2: tuple[float, ...]
    aggregate2: float


def module_alignment(updates: Sequence[ClientUpdate], *, absent_weight: float = 0.0) -> ModuleAlignment:
    """Inner products of each update with the module's weighted aggregate, from the r×r Grams in float64."""
    if not updates:
        raise AggregationError("no updates to compare with an aggregate")
    weights = torch.tensor([float(u.weight) for u in updates], dtype=_F64)
    total = float(weights.sum()) + float(absent_weight)
    if not (math.isfinite(total) and total > 0) or bool((weights < 0).any()):
        raise AggregationError(f"weights must be >= 0 with a positive finite sum, got {weights.tolist()}")
    w = weights / total
    shared = _shared_factor(updates)
    if shared is not None:
        return _shared_alignment(updates, w, shared)
    gram = gram_matrix(updates)
    gw = gram @ w
    return ModuleAlignment(
        dots=tuple(float(x) for x in gw),
        norms2=tuple(max(float(x), 0.0) for x in torch.diagonal(gram)),
        aggregate2=max(float(w @ gw), 0.0),
    )


def _shared_factor(updates: Sequence[ClientUpdate]) -> str | None:
    """``"A"`` or ``"B"`` when every update holds the very same such factor (a linear strategy's frozen one)."""
    if len(updates) < 2 or any(u.R is not None for u in updates):
        return None
    for name in ("A", "B"):
        first = getattr(updates[0], name)
        # the very tensor (a shard hands every holder the published one) needs no comparison
        if all(getattr(u, name) is first or torch.equal(getattr(u, name), first) for u in updates[1:]):
            return name
    return None


def _shared_alignment(updates: Sequence[ClientUpdate], w: torch.Tensor, shared: str) -> ModuleAlignment:
    """:func:`module_alignment` where every ``U_i = s_i X_i F`` (``F`` = the shared A) or ``s_i F X_i`` (a shared
    B): ``<U_i, U_j> = s_i s_j sum(P_ij ∘ M)`` with ``M`` the shared factor's r×r Gram, in float64.

    With ``X̄ = Σ w_i s_i X_i``: ``<U_i, G> = s_i <X_i, X̄ M>`` (one d'×r product, then an inner product of d'·r
    per client), ``‖U_i‖² = s_i² sum((X_iᵀ X_i) ∘ M)`` and ``‖G‖² = <X̄, X̄ M>``; one client's factor is in
    float64 at a time."""
    a_shared = shared == "A"

    def trained(u: ClientUpdate) -> torch.Tensor:
        # a shared B is a shared A of the transposed updates (s_i A_iᵀ Bᵀ): inner products do not change
        return u.B if a_shared else u.A.T  # (d', r)

    scales = [float(u.scaling) for u in updates]
    f = (updates[0].A if a_shared else updates[0].B.T).to(_F64)  # (r, d): the shared factor
    m = f @ f.T
    mean = torch.zeros(trained(updates[0]).shape, dtype=_F64)
    for c, u in zip((w * torch.tensor(scales, dtype=_F64)).tolist(), updates, strict=True):
        mean.add_(trained(u), alpha=c)  # float64 accumulator
    projected = mean @ m
    dots, norms2 = [], []
    for s, u in zip(scales, updates, strict=True):
        x = trained(u).to(_F64)
        dots.append(s * float((x * projected).sum()))
        norms2.append(max(s * s * float(((x.T @ x) * m).sum()), 0.0))
    aggregate2 = float((mean * projected).sum())
    return ModuleAlignment(dots=tuple(dots), norms2=tuple(norms2), aggregate2=max(aggregate2, 0.0))


@dataclass
class AlignmentSums:
    """Adapter-wide sums of module alignments, per client; additive (shards merge theirs)."""

    dots: dict[str, float] = field(default_factory=dict)
    norms2: dict[str, float] = field(default_factory=dict)
    aggregate2: float = 0.0

    def add(self, clients: Sequence[str], part: ModuleAlignment) -> None:
        """Fold in one module whose updates came from ``clients`` (in the order of ``part``)."""
        if len(clients) != len(part.dots):
            raise AggregationError(f"{len(clients)} clients for {len(part.dots)} updates")
        for client, dot, norm2 in zip(clients, part.dots, part.norms2, strict=True):
            self.dots[client] = self.dots.get(client, 0.0) + dot
            self.norms2[client] = self.norms2.get(client, 0.0) + norm2
        self.aggregate2 += part.aggregate2

    def merge(self, other: AlignmentSums) -> None:
        for client, dot in other.dots.items():
            self.dots[client] = self.dots.get(client, 0.0) + dot
        for client, norm2 in other.norms2.items():
            self.norms2[client] = self.norms2.get(client, 0.0) + norm2
        self.aggregate2 += other.aggregate2

    def cosines(self) -> dict[str, float | None]:
        """Each client's cosine to the aggregate over the whole adapter; None where either norm is zero."""
        return {c: cosine(self.dots[c], self.norms2.get(c, 0.0), self.aggregate2) for c in sorted(self.dots)}

    def to_dict(self) -> dict[str, object]:
        return {"dots": dict(self.dots), "norms2": dict(self.norms2), "aggregate2": self.aggregate2}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> AlignmentSums:
        dots, norms2 = d.get("dots") or {}, d.get("norms2") or {}
        if not isinstance(dots, Mapping) or not isinstance(norms2, Mapping):
            raise AggregationError("alignment sums must map clients to numbers")
        aggregate2 = d.get("aggregate2", 0.0)
        if not isinstance(aggregate2, (int, float)):
            raise AggregationError("alignment sums need a numeric aggregate2")
        return cls(
            {str(k): float(v) for k, v in dots.items()},
            {str(k): float(v) for k, v in norms2.items()},
            float(aggregate2),
        )


def combine(parts: Iterable[AlignmentSums]) -> AlignmentSums:
    """The sums of several shards (in the order given: float addition is ordered)."""
    total = AlignmentSums()
    for part in parts:
        total.merge(part)
    return total


def cosine(dot: float, norm2: float, aggregate2: float) -> float | None:
    """``dot / (‖u‖ ‖g‖)`` clamped to [-1, 1]; None when either vector is zero (no direction)."""
    denominator = math.sqrt(max(norm2, 0.0)) * math.sqrt(max(aggregate2, 0.0))
    if not (denominator > 0 and math.isfinite(denominator) and math.isfinite(dot)):
        return None
    return max(-1.0, min(1.0, dot / denominator))
