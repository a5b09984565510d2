"""The server optimiser's part of a shard: the previous global and state in, stepped results and new state out.

With ``--server-opt``, a shard reads, for its items, the published global of the round the plan
steps from (``Plan.previous``: round 0's initial adapter for round 1) and the optimiser state that
round's shards wrote, steps each item's exact aggregate (``aggregation.server_opt``), and writes the
new state as a third object per shard (``opt-state``), which the commit lists in the manifest.
Every input is a write-once object of a complete round, so a rerun writes the same bytes. Only the
next round reads a state: older ones are deleted by :func:`collect_states`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..aggregation import ModuleResult
from ..aggregation.server_opt import (
    PreviousFactors,
    ServerOptConfig,
    State,
    product_space,
    state_shapes,
    step_factors,
    step_module,
    step_tensor,
    step_trained,
)
from ..names import Factor, RoundStatus
from ..results import fetch_manifest
from ..state import FederationConfig
from ..strategy import strategy_spec
from .previous import Part, PreviousGlobal, open_part, previous_global
from .round_plan import Plan
from .runtime import Runtime

log = logging.getLogger(__name__)

_F32 = torch.float32
Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def server_opt_config(config: FederationConfig) -> ServerOptConfig:
    """The federation's server optimiser as the math takes it."""
    return ServerOptConfig(
        optimizer=config.server_opt,
        lr=config.server_step_size,
        momentum=config.server_momentum,
        beta1=config.server_beta1,
        beta2=config.server_beta2,
        tau=config.server_tau,
    )


def state_key(item: str, slot: str) -> str:
    """The tensor name of ``item``'s state ``slot`` in an opt-state object."""
    return f"{item}.opt_{slot}"


@dataclass
class ServerStep:
    """One shard's server step: ``product`` says whether modules step in product space; else a linear strategy
    steps the factor its clients trained this round (``trained``), and fedavg both factors."""

    cfg: ServerOptConfig
    product: bool
    previous: PreviousGlobal
    state: Part  # the previous state, read item by item (dense: the shard's whole state may be large)
    #: a linear strategy: the factor this round's clients trained, and every factor it trains in some round
    trained: Factor | None = None
    trains: tuple[Factor, ...] = ()
    #: ``--personal-heads``: every round publishes round 0's head unchanged, so no head keeps a state
    fixed_heads: bool = False

    @classmethod
    def open(
        cls,
        rt: Runtime,
        federation: str,
        plan: Plan,
        config: FederationConfig,
        items: Iterable[str],
        stack: contextlib.ExitStack,
        trained: Factor | None = None,
    ) -> ServerStep | None:
        """The step for ``items`` of a round under ``plan`` (its state objects stay open until ``stack``
        closes), in which clients trained ``trained`` (a linear strategy's factor of the round); None without a
        server optimiser."""
        return cls.start(
            rt,
            federation,
            plan.previous,
            config,
            items,
            stack,
            product=product_space(plan.strategy, dp=plan.dp),
            trained=trained,
            fixed_heads=bool(plan.heads),
        )

    @classmethod
    def start(
        cls,
        rt: Runtime,
        federation: str,
        previous_round: int | None,
        config: FederationConfig,
        items: Iterable[str],
        stack: contextlib.ExitStack,
        *,
        product: bool,
        trained: Factor | None = None,
        fixed_heads: bool = False,
    ) -> ServerStep | None:
        """The step from the global and optimiser state round ``previous_round`` published (None: none), for
        ``items``; a plain round's (:meth:`open`) or a secure round's (``workers/secure_sum.py``)."""
        cfg = server_opt_config(config)
        if not cfg.enabled:
            return None
        items = sorted(items)
        previous = previous_global(rt, federation, previous_round, items)
        state = Part()
        if previous_round is not None:
            manifest, _ = fetch_manifest(rt.state, rt.store, federation, previous_round)
            keys = {state_key(item, slot) for item in items for slot in _all_slots(cfg)}
            state = open_part(rt, manifest, lambda shard: shard.opt_state, items, keys, stack)
        trains = strategy_spec(config.strategy).trains if trained is not None else ()
        return cls(cfg, product, previous, state, trained, trains, fixed_heads=fixed_heads)

    def residual_form(self, extra: bool, form: str) -> str:
        """A module stepped in product space publishes a dense residual (``s_p B_p A_p + U − s B A``)."""
        return "dense" if self.product and not extra else form

    def layout(self, item: str, *, extra: bool, shape: tuple[int, ...], rank: int) -> Layout:
        """The state tensors ``item`` writes (float32), in a fixed order."""
        if extra and self.fixed_heads:
            return []  # round 0's head, published as it is: nothing steps it
        if extra or self.product:
            shapes = state_shapes(self.cfg, shape)
        else:
            d_out, d_in = shape
            trained = self.trains or (Factor.LORA_A, Factor.LORA_B)
            shapes = state_shapes(self.cfg, shape, factors=(rank, d_out, d_in), trained=trained)
        return [(state_key(item, slot), _F32, dims) for slot, dims in shapes.items()]

    def module(self, name: str, result: ModuleResult) -> tuple[ModuleResult, dict[str, Tensor]]:
        """Step module ``name``'s aggregate; its new state by tensor name."""
        prev = self.previous.modules.get(name)
        factors = None if prev is None else PreviousFactors(prev.A, prev.B, prev.scaling, prev.R)
        mine = self._state(name)
        if self.trained is not None:
            stepped, new = step_trained(result, factors, mine, self.cfg, self.trained, self.trains)
        else:
            stepped, new = (step_module if self.product else step_factors)(result, factors, mine, self.cfg)
        return stepped, self._named(name, new)

    def extra(self, name: str, tensor: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Step extra ``name`` (a task head) elementwise; its new state by tensor name."""
        stepped, new = step_tensor(tensor, self.previous.extras.get(name), self._state(name), self.cfg)
        return stepped, self._named(name, new)

    def _state(self, item: str) -> State:
        found = {slot: self.state.find(state_key(item, slot)) for slot in _all_slots(self.cfg)}
        return {slot: value for slot, value in found.items() if value is not None}

    @staticmethod
    def _named(item: str, state: State) -> dict[str, Tensor]:
        # in name order, as the shard's layout lists them (``state_shapes``)
        return {state_key(item, slot): state[slot].to(_F32).contiguous() for slot in sorted(state)}


def _all_slots(cfg: ServerOptConfig) -> list[str]:
    """Every slot name a state may hold: product space or a tensor, and each factor's (fedavg, linear)."""
    return [*cfg.slots, *(f"{factor}.{slot}" for factor in Factor for slot in cfg.slots)]


def collect_states(rt: Runtime, federation: str) -> list[int]:
    """Delete the optimiser state objects of every complete round before the latest complete one (only the
    round after the latest reads its state); returns the rounds whose states went. A cursor in Redis makes
    each round's manifest read once; idempotent, and safe to run twice at once (deleting is)."""
    latest = rt.state.latest_complete(federation)
    if latest is None:
        return []
    start = rt.state.opt_cursor(federation)
    collected = []
    for r in range(max(start, 1), latest):  # round 0 (an initial adapter) has no state
        if rt.state.round(federation, r).state != RoundStatus.COMPLETE:
            continue
        manifest, _ = fetch_manifest(rt.state, rt.store, federation, r)
        refs = [s.opt_state for s in manifest.shards if s.opt_state is not None]
        for ref in refs:
            rt.store.delete(ref.key)
        if refs:
            collected.append(r)
    if latest > start:
        rt.state.advance_opt_cursor(federation, latest)
    if collected:
        log.info("collected the server optimiser state of %s rounds %s", federation, collected)
    return collected
