"""A buffered federation's flush in the workers: its plan fields, its wait, and the exact step per item.

A flush (round ``r``, a frozen buffer) moves the latest complete version ``v`` (``Plan.previous``; every
earlier flush has ended before it is planned, so versions are published in order). Each delta counts with
``p_i = w_i g(τ_i) / Σ w_j g(τ_j)``, ``τ_i = v − b_i``, baked into ``Plan.weights``; each shard reads, for its
own items, the adapters of ``v`` and of every base version, and turns the strategy's aggregate into version
``v + 1`` (``aggregation.buffered.flush_module``; a linear strategy's trained factor alone,
``flush_trained``). DESIGN.md section 1, "Buffered flushes".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..aggregation import ModuleResult
from ..aggregation.buffered import (
    StalenessRule,
    clip_into_absent,
    delta_clip_factors,
    delta_norm_sq,
    dp_flush_weights,
    flush_module,
    flush_residual_form,
    flush_trained,
    flush_weights,
    version_coefficients,
)
from ..aggregation.dp import adapter_clip_factor, head_step
from ..aggregation.dp_linear import trained_step
from ..aggregation.server_opt import PreviousFactors, factor_of
from ..errors import AggregationError
from ..names import Factor, RoundStatus
from ..state import FederationConfig
from ..state.records import term_client
from ..state.rounds import DeltaRecord
from ..strategy import strategy_spec
from .previous import PreviousGlobal, previous_global
from .round_plan import Plan
from .runtime import Runtime

log = logging.getLogger(__name__)

_F64 = torch.float64


def flush_fields(
    rt: Runtime,
    federation: str,
    config: FederationConfig,
    records: Mapping[str, DeltaRecord],
    weights: Mapping[str, float],
) -> tuple[dict[str, float], dict[str, Any]]:
    """The flush weights ``p`` (policy weights times ``g(τ)``, normalised) and the Plan's buffered fields."""
    previous = rt.state.latest_complete(federation) or 0
    clients = sorted(weights)
    bases: dict[str, int] = {}
    for c in clients:
        base = records[c].base_version
        if base is None or base > previous:
            raise AggregationError(
                f"client {c!r}'s delta names base version {base}; the flush moves version {previous}"
            )
        bases[c] = base
    staleness = {c: previous - bases[c] for c in clients}
    rule = StalenessRule.parse(config.staleness_weight)
    clip: dict[str, float] = {}
    if config.dp_noise_multiplier:
        p = dp_weights(rt, federation, config, records, clients, bases, staleness, rule)
    else:
        p = flush_weights([weights[c] for c in clients], [staleness[c] for c in clients], rule)
        if config.clip_norm or config.relative_clip:
            clip = delta_clips(config, delta_norms(rt, federation, records, clients, bases))
    fields: dict[str, Any] = {
        "previous": previous,
        "bases": bases,
        "staleness": staleness,
        "flush_lr": config.server_step_size,
        "clip": clip,
    }
    return dict(zip(clients, p, strict=True)), fields


def delta_norms(
    rt: Runtime, federation: str, records: Mapping[str, DeltaRecord], terms: Sequence[str], bases: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Each term's ``||Δ||_F^2`` per module it sent, its update against its own base version
    (``aggregation.buffered.delta_norm_sq``). Reads every module of every delta and of every base version once."""
    from .reading import RoundInputs

    inputs = RoundInputs(rt, {t: records[t] for t in terms})
    modules = sorted({m for t in terms for m in inputs.indexes[t].modules})
    exists = rt.state.round(federation, 0).state == RoundStatus.COMPLETE
    versions = {
        b: previous_global(rt, federation, b if b > 0 or exists else None, modules) for b in sorted(set(bases.values()))
    }
    sandwich = strategy_spec(rt.state.config(federation).strategy).sandwich
    out: dict[str, dict[str, float]] = {}
    for t in terms:
        base = versions[bases[t]].modules
        out[t] = {}
        for m in sorted(inputs.indexes[t].modules):
            u = inputs.update(t, m, 1.0)
            b = base.get(m)
            update = PreviousFactors(u.A, u.B, u.scaling, u.R)
            if sandwich:  # Fed-SB: the upload's R (read as both factors) inside its base version's frame
                if b is None or b.R is None:
                    raise AggregationError(f"module {m!r}: base version {bases[t]} published no fed-sb frame")
                update = PreviousFactors(b.A, b.B, u.scaling, u.A)
            out[t][m] = delta_norm_sq(update, None if b is None else PreviousFactors(b.A, b.B, b.scaling, b.R))
    return out


def trained_step_norms(
    rt: Runtime,
    federation: str,
    records: Mapping[str, DeltaRecord],
    bases: Mapping[str, int],
    current: int,
    trains: Factor,
) -> dict[str, dict[str, float]]:
    """A linear strategy under DP: each term's ``||ΔX||_F^2`` per module it sent, its step of the trained factor
    ``trains`` against its own base version in the units of version ``current`` (``aggregation.dp_linear``).
    Reads each delta's modules and the versions' once."""
    from .reading import RoundInputs

    terms = sorted(bases)
    inputs = RoundInputs(rt, {t: records[t] for t in terms})
    modules = sorted({m for t in terms for m in inputs.indexes[t].modules})
    versions = {b: previous_global(rt, federation, b, modules).modules for b in sorted({current, *bases.values()})}
    sandwich = strategy_spec(rt.state.config(federation).strategy).sandwich
    out: dict[str, dict[str, float]] = {}
    for t in terms:
        out[t] = {}
        for m in sorted(inputs.indexes[t].modules):
            base, now = versions[bases[t]].get(m), versions[current].get(m)
            if base is None or now is None:
                raise AggregationError(f"module {m!r}: version {bases[t]} or {current} published no adapter for it")
            u = inputs.update(t, m, 1.0)
            # Fed-SB: the index spans the upload's lora_R as both factors
            mine = u.A if sandwich else factor_of(PreviousFactors(u.A, u.B, u.scaling), trains)
            theirs = factor_of(PreviousFactors(base.A, base.B, base.scaling, base.R), trains)
            if mine is None or theirs is None:
                raise AggregationError(f"module {m!r}: version {bases[t]} published no {trains} to step from")
            step = trained_step(mine, u.scaling, theirs, base.scaling, now.scaling)
            out[t][m] = float(step.square().sum())
    return out


def head_step_norms(
    rt: Runtime,
    federation: str,
    records: Mapping[str, DeltaRecord],
    bases: Mapping[str, int | None],
    heads: Sequence[str],
) -> dict[str, dict[str, float]]:
    """DP: each term's ``||h_i − h_b||_F^2`` per task head tensor (``heads``), its head's step against the head of
    the version it trained from (``bases``: a synchronous round's start, a flush delta's base version; None, or a
    version that published no head: zeros). Joins the adapter's norms in the term's one clip factor."""
    from .reading import RoundInputs

    if not heads:
        return {t: {} for t in bases}
    inputs = RoundInputs(rt, {t: records[t] for t in bases})
    used = sorted({b for b in bases.values() if b is not None})
    versions = {b: previous_global(rt, federation, b, heads).extras for b in used}
    out: dict[str, dict[str, float]] = {}
    for t, b in sorted(bases.items()):
        published = versions[b] if b is not None else {}
        out[t] = {h: float(head_step(inputs.extra(t, h), published.get(h)).square().sum()) for h in heads}
    return out


def dp_clips(config: FederationConfig, *norms_sq: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """A synchronous DP round's clip factors ``min(1, C / ||x_i||)``, ``x_i`` everything client i contributes
    (every item of every mapping in ``norms_sq``: its modules' updates, its head's step) together, keyed
    ``"client|item"`` for every item it sent (only those below 1)."""
    out = {}
    for c in sorted(norms_sq[0]):
        items = {item: sq for part in norms_sq for item, sq in part.get(c, {}).items()}
        factor = adapter_clip_factor(items.values(), config.clip_norm)
        if factor < 1.0:
            out.update({f"{c}|{item}": factor for item in sorted(items)})
    return out


def delta_clips(config: FederationConfig, norms_sq: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``--clip-norm`` / ``--relative-clip`` on each delta's update against its own base version: the factors
    below 1, keyed ``"term|module"`` like a synchronous round's (``aggregation.buffered.delta_clip_factors``)."""
    terms = sorted(norms_sq)
    modules = sorted({m for t in terms for m in norms_sq[t]})
    norms = torch.full((len(modules), len(terms)), float("nan"), dtype=_F64)
    for i, t in enumerate(terms):
        for j, m in enumerate(modules):
            if m in norms_sq[t]:
                norms[j, i] = norms_sq[t][m] ** 0.5
    factors = delta_clip_factors(norms, config.clip_norm, config.relative_clip)
    return {
        f"{t}|{m}": float(factors[j, i])
        for i, t in enumerate(terms)
        for j, m in enumerate(modules)
        if m in norms_sq[t] and float(factors[j, i]) != 1.0
    }


def dp_weights(
    rt: Runtime,
    federation: str,
    config: FederationConfig,
    records: Mapping[str, DeltaRecord],
    terms: Sequence[str],
    bases: Mapping[str, int],
    staleness: Mapping[str, int],
    rule: StalenessRule,
) -> tuple[float, ...]:
    """A DP flush's weight of each term: its fixed public weight ``g(τ) / (K k)`` times its clip factor
    ``min(1, C / ||Δ||)``, ``Δ`` its update against its own base version over the whole adapter
    (``aggregation.buffered``, DP)."""
    owners = [term_client(t) for t in terms]
    counts = [owners.count(o) for o in owners]
    q = dp_flush_weights([staleness[t] for t in terms], counts, rule, config.quorum)
    spec = strategy_spec(config.strategy)
    if spec.linear:  # the release is the trained factor: its step is what is clipped (aggregation.dp_linear)
        trains = spec.trainable(1)
        assert trains is not None  # a frozen shared frame always names what its clients train
        current = rt.state.latest_complete(federation) or 0
        norms = trained_step_norms(rt, federation, records, {t: bases[t] for t in terms}, current, trains)
    else:
        norms = delta_norms(rt, federation, records, terms, bases)
    # the head's step against the delta's own base version's head, in the same one clip factor
    heads = published_heads(rt, federation, config)
    steps = head_step_norms(rt, federation, records, {t: _version(rt, federation, bases[t]) for t in terms}, heads)
    return tuple(
        weight * adapter_clip_factor([*norms[t].values(), *steps[t].values()], config.clip_norm)
        for t, weight in zip(terms, q, strict=True)
    )


def published_heads(rt: Runtime, federation: str, config: FederationConfig) -> tuple[str, ...]:
    """The task head tensors a release publishes from the clients' data: the declared extras, none where the
    clients keep their heads (``--personal-heads``: every round publishes round 0's)."""
    from .declared import declared_model

    declared = declared_model(rt, federation, config)
    return () if declared.heads_local else declared.extras


def _version(rt: Runtime, federation: str, version: int) -> int | None:
    """``version`` as ``previous_global`` reads it: version 0 without an initial adapter published nothing."""
    exists = version > 0 or rt.state.round(federation, 0).state == RoundStatus.COMPLETE
    return version if exists else None


def holder_weights(plan: Plan, name: str, holders: Sequence[str], absent: float) -> tuple[list[float], float]:
    """A flush's module ``name``: each holder's weight and the absent mass, with a norm bound's clip factors kept
    apart from the strategy's renormalisation (``aggregation.buffered.clip_into_absent``); the plan's as they are
    otherwise (a synchronous round clips the uploads themselves; a DP flush's weights are already clipped)."""
    weights = [plan.weights[c] for c in holders]
    if not plan.flush_lr or plan.dp or not plan.clip:
        return weights, absent
    return clip_into_absent(weights, [plan.clip.get(f"{c}|{name}", 1.0) for c in holders], absent)


@dataclass
class FlushStep:
    """One shard's flush: the adapters of the version it moves and of every base version, for its items."""

    plan: Plan
    versions: dict[int, PreviousGlobal] = field(default_factory=dict)

    @classmethod
    def open(cls, rt: Runtime, federation: str, plan: Plan, items: Iterable[str]) -> FlushStep | None:
        """The step for ``items`` of a flush under ``plan``; None for a synchronous round."""
        if not plan.flush_lr:
            return None
        wanted = sorted(items)
        step = cls(plan)
        assert plan.previous is not None  # every flush plan fixes the version it moves
        for version in sorted({plan.previous, *plan.bases.values()}):
            # version 0 without an initial adapter published nothing: a zero product
            exists = version > 0 or rt.state.round(federation, 0).state == RoundStatus.COMPLETE
            step.versions[version] = previous_global(rt, federation, version if exists else None, wanted)
        return step

    def _factors(self, version: int, name: str) -> PreviousFactors | None:
        module = self.versions[version].modules.get(name)
        return None if module is None else PreviousFactors(module.A, module.B, module.scaling, module.R)

    @property
    def linear(self) -> bool:
        """The strategy keeps a frozen shared frame: the flush moves the trained factor, no residual."""
        return strategy_spec(self.plan.strategy).frozen_shared

    def masses(self, name: str, holders: Sequence[str], absent: float) -> dict[int, float]:
        """``P_b`` over module ``name``'s holders, normalised as the strategy normalises them (with the absent mass,
        ``absent`` before any clip: :func:`holder_weights`): a client that did not train the module leaves it as it
        was (its update is zero there). A DP flush's weights are fixed and clipped (``dp_weights``): never
        renormalised."""
        weights, absent = holder_weights(self.plan, name, holders, absent)
        total = 1.0 if self.plan.dp else sum(weights) + absent
        out: dict[int, float] = {}
        for c, w in zip(holders, weights, strict=True):
            b = self.plan.bases[c]
            out[b] = out.get(b, 0.0) + w / total
        return dict(sorted(out.items()))

    def residual_form(
        self, name: str, holders: Sequence[str], absent: float, shape: tuple[int, int], form: str, rank: int, k: int
    ) -> tuple[str, int]:
        """The published residual's form and rank (factored), from metadata: the layout streams it."""
        if self.linear:
            return form, k  # the strategy's own: none
        return flush_residual_form(
            shape,
            form,
            k,
            rank,
            self.plan.flush_lr,
            self._version_terms(name, holders, absent),
        )

    def _version_terms(self, name: str, holders: Sequence[str], absent: float) -> list[tuple[PreviousFactors, float]]:
        """Each version's adapter with its coefficient: ``[b = v] − η P_b``."""
        assert self.plan.previous is not None
        coeffs = version_coefficients(self.plan.previous, self.masses(name, holders, absent), self.plan.flush_lr)
        terms = []
        for version, coeff in coeffs.items():
            factors = self._factors(version, name)
            if factors is not None:
                terms.append((factors, coeff))
            elif self.linear and coeff != 0.0:  # a zero product is no frame: the trained factor cannot take it
                raise AggregationError(f"module {name!r}: version {version} published no adapter for it")
        return terms

    def module(
        self, name: str, holders: Sequence[str], absent: float, result: ModuleResult, trains: Factor | None = None
    ) -> ModuleResult:
        """Version ``v + 1`` of module ``name`` from the strategy's aggregate (``trains``: a linear strategy's
        trained factor)."""
        terms = self._version_terms(name, holders, absent)
        if self.linear:
            assert trains is not None  # a frozen shared frame always names what its clients train
            return flush_trained(result, terms, self.plan.flush_lr, trains)
        return flush_module(result, terms, self.plan.flush_lr)

    def extra(self, name: str, holders: Sequence[str], mean: Tensor) -> Tensor:
        """A head: ``h_v + η (mean − Σ P_b h_b)`` over the holders; the mean as it is when a version lacks it."""
        assert self.plan.previous is not None
        heads = {b: self.versions[b].extras.get(name) for b in self.versions}
        if any(h is None for h in heads.values()):
            return mean
        step = mean.to(_F64).clone()
        for b, m in self.masses(name, holders, 0.0).items():
            head = heads[b]
            assert head is not None
            step -= head.to(_F64) * m
        current = heads[self.plan.previous]
        assert current is not None
        return (current.to(_F64) + step * self.plan.flush_lr).to(torch.float32)


def manifest_fields(plan: Plan, config: FederationConfig) -> dict[str, Any] | None:
    """The manifest's ``buffered`` entry: the version the flush moved, η and g (None: a synchronous round)."""
    if not plan.flush_lr:
        return None
    return {"previous_version": plan.previous, "server_lr": plan.flush_lr, "staleness_weight": config.staleness_weight}
