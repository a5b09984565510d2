"""Each aggregation strategy as one object: what it publishes, what clients train, what it combines with.

Torch-free and below every layer that asks (aggregation's layout and math, the workers' shards and
ingest, the federation config, training, the CLI), so a strategy's properties are said once here and
read everywhere else through :func:`strategy_spec`. The math itself lives in
:mod:`chorus_mq.aggregation.strategies`, keyed by :attr:`StrategySpec.rule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError
from .names import Factor, Strategy

#: how a module's aggregate is computed and laid out (aggregation.strategies / aggregation.shapes)
Rule = Literal["fedavg", "fedex", "svd", "stack", "shared", "sandwich"]


@dataclass(frozen=True)
class StrategySpec:
    """One strategy's properties (docs/DESIGN.md section 1)."""

    name: Strategy
    #: how the module math and the output layout are computed
    rule: Rule
    #: the published model is the exact weighted average of the clients' products
    exact: bool
    #: may publish a residual (a correction outside the adapter) at float32 output
    residual: bool
    #: the aggregate is a weighted sum of one uploaded tensor per module, so masking-based secure
    #: aggregation can compute it without seeing any client's tensor
    linear: bool
    #: the rule rewrites each client's factors from its product first (aggregation/canonical.py)
    canonicalises: bool
    #: which factor clients train in round r: ``trains[(r - 1) % len(trains)]``; () = both factors
    trains: tuple[Factor, ...] = ()
    #: ``--out-rank`` chooses the output rank (only a truncating rule can honour it)
    out_rank_option: bool = False
    #: a client may train at its own rank (the global is fitted to it; what does not fit is carried)
    own_rank: bool = True
    #: a client starting below the global rank carries the remainder in its base (stack drops it: its
    #: global rank is the sum of the uploads' and would otherwise multiply every round)
    keeps_remainder: bool = True
    #: combinations: server optimiser, SCAFFOLD, personal heads, robust aggregates (server-side DP combines with
    #: every strategy: a linear one noises its trained factor alone, aggregation/dp_linear.py)
    server_opt: bool = True
    scaffold: bool = True
    personal_heads: bool = True
    robust: bool = True
    #: why a buffered flush (``--mode buffered``) cannot be exact for this strategy; "": it can
    #: (aggregation/buffered.py: a residual per base version, or for a frozen shared frame the trained factor)
    not_buffered: str = ""

    @property
    def buffered(self) -> bool:
        """A buffered flush is exact for this strategy (DESIGN.md section 1, "Buffered flushes")."""
        return not self.not_buffered

    @property
    def frozen_shared(self) -> bool:
        """Some factor is frozen every round, shared by every client (never changed by a client)."""
        return bool(self.trains)

    @property
    def sandwich(self) -> bool:
        """Both LoRA factors are frozen and shared; clients train and upload only ``lora_R`` (Fed-SB)."""
        return self.rule == "sandwich"

    def trainable(self, round_: int) -> Factor | None:
        """The factor clients train in round ``round_`` (>= 1); None: both."""
        if not self.trains:
            return None
        return self.trains[(max(round_, 1) - 1) % len(self.trains)]

    def frozen(self, round_: int) -> Factor | None:
        """The one factor frozen and shared in round ``round_`` whose upload ingest checks bit for bit;
        None: none, or both (Fed-SB: B and A are never uploaded, see :attr:`sandwich`)."""
        trained = self.trainable(round_)
        if trained is None or trained == Factor.LORA_R:
            return None
        return Factor.LORA_A if trained == Factor.LORA_B else Factor.LORA_B

    def framed(self, round_: int) -> tuple[Factor, ...]:
        """The factors round ``round_`` (>= 1) freezes and shares, which its output refers to where they were
        last written instead of writing them again (``Manifest.frame``): Fed-SB's B and A, the others' frozen
        one; () for strategies that train both."""
        if self.sandwich:
            return (Factor.LORA_A, Factor.LORA_B)
        frozen = self.frozen(round_)
        return () if frozen is None else (frozen,)


def _shared(strategy: Strategy, rule: Rule, trains: tuple[Factor, ...], not_buffered: str = "") -> StrategySpec:
    """A linear strategy: a frozen shared frame, one averaged factor, no residual, none of the combinations
    that need each client's factors (one rank for every client); a server optimiser steps the trained factor
    (``aggregation.server_opt.step_trained``)."""
    return StrategySpec(
        strategy,
        rule,
        exact=True,
        residual=False,
        linear=True,
        canonicalises=False,
        trains=trains,
        own_rank=False,
        scaffold=False,
        personal_heads=False,
        robust=False,
        not_buffered=not_buffered,
    )


_SPECS: dict[Strategy, StrategySpec] = {
    Strategy.FEDEX_LORA: StrategySpec(
        Strategy.FEDEX_LORA, "fedex", exact=True, residual=True, linear=False, canonicalises=True
    ),
    Strategy.FEDAVG: StrategySpec(
        Strategy.FEDAVG,
        "fedavg",
        exact=False,
        residual=False,
        linear=False,
        canonicalises=True,
        not_buffered="fedavg has no residual to absorb each base version's adapter",
    ),
    Strategy.SVD: StrategySpec(
        Strategy.SVD, "svd", exact=True, residual=True, linear=False, canonicalises=True, out_rank_option=True
    ),
    Strategy.STACK: StrategySpec(
        Strategy.STACK,
        "stack",
        exact=True,
        residual=False,
        linear=False,
        canonicalises=True,
        keeps_remainder=False,
        server_opt=False,
        scaffold=False,
        not_buffered="stack's clients train from a truncation of the published model, not from it",
    ),
    Strategy.FFA_LORA: _shared(Strategy.FFA_LORA, "shared", (Factor.LORA_B,)),
    # B first: round 0's B is zero, so training A against it first would learn nothing
    Strategy.ROLORA: _shared(
        Strategy.ROLORA,
        "shared",
        (Factor.LORA_B, Factor.LORA_A),
        # a delta from version b trained the factor of b + 1 against b's other factor, frozen; from a base one
        # version back it trained the other factor than the flush's, from two or more back against a frozen
        # factor that has changed since: only fresh deltas fit version v's adapter without a residual
        not_buffered=(
            "rolora alternates the trained factor every version, so a delta from an older version either "
            "trained the other factor or trained against a frozen factor that has changed since; no adapter "
            "of the published rank holds it, and rolora publishes no residual (use ffa-lora or fed-sb)"
        ),
    ),
    Strategy.FED_SB: _shared(Strategy.FED_SB, "sandwich", (Factor.LORA_R,)),
}


def strategy_spec(strategy: Strategy | str) -> StrategySpec:
    """The spec of ``strategy`` (a member or its value); ValueError naming the choices for anything else."""
    try:
        member = Strategy(strategy)
    except ValueError:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(Strategy.values())}") from None
    return _SPECS[member]


def all_specs() -> tuple[StrategySpec, ...]:
    """Every strategy's spec, in the enum's order."""
    return tuple(_SPECS[m] for m in Strategy)


def check_buffered(strategy: Strategy | str) -> None:
    """ConfigError, saying why, for a strategy a buffered flush (``--mode buffered``) is not exact for."""
    spec = strategy_spec(strategy)
    if spec.buffered:
        return
    allowed = ", ".join(s.name.value for s in all_specs() if s.buffered)
    raise ConfigError(
        f"--mode buffered is exact per flush only for --strategy {allowed}; {spec.name.value} is not supported: "
        f"{spec.not_buffered}"
    )
