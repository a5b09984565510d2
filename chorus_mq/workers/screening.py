"""Robust screening of a round, before it is sharded: who is aggregated, with which weight, clipped how much.

Screening needs adapter-wide statistics, so it reads every module of every delta once (via
the indexes, module by module, never a dense update) to build r x r Gram statistics; the
decision goes into the round's plan and the shards apply it. The math is
``aggregation.robust``; this module only feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..adapters import ModuleEntry
from ..aggregation.robust import GramAccumulator, RobustPolicy, relative_clip_factors
from ..state import FederationConfig
from ..state.rounds import DeltaRecord
from .reading import RoundInputs, load_index
from .runtime import Runtime


@dataclass
class Screening:
    """Kept clients' weights, the excluded ones with their reason, and clip factors ("client|module")."""

    weights: dict[str, float]
    excluded: dict[str, str] = field(default_factory=dict)
    clip: dict[str, float] = field(default_factory=dict)
    #: each kept client's squared update norm per module it sent (DP joins its head's step to them: ``plan.py``)
    norms_sq: dict[str, dict[str, float]] = field(default_factory=dict)


def screen_round(
    rt: Runtime, records: Mapping[str, DeltaRecord], weights: Mapping[str, float], config: FederationConfig
) -> Screening:
    """Run the federation's robust policy over every module; memory stays one module x N clients."""
    inputs = RoundInputs(rt, records)
    clients = list(records)
    policy = RobustPolicy(
        detect_outliers=bool(config.screen_outliers),
        z_threshold=config.outlier_z,
        clip_norm=config.clip_norm or None,
        aggregate=str(config.robust_aggregate),
        trim=config.trim,
    )
    acc = GramAccumulator(len(clients), policy)
    modules = sorted({m for c in clients for m in inputs.indexes[c].modules})
    for name in modules:
        acc.add(name, [inputs.update(c, name, 1.0) if name in inputs.indexes[c].modules else None for c in clients])
    res = acc.screen(weights=[weights[c] for c in clients])
    kept = set(res.kept)
    screening = Screening(
        weights={c: float(res.weights[i]) for i, c in enumerate(clients) if i in kept},
        excluded={clients[i]: reason for i, reason in res.excluded.items()},
    )
    module_norms = res.stats["module_norm"]  # (clients, modules)
    for i, c in enumerate(clients):
        if i in kept:
            screening.norms_sq[c] = {
                name: float(module_norms[i, m]) ** 2
                for m, name in enumerate(res.modules)
                if name in inputs.indexes[c].modules
            }
        for m, name in enumerate(res.modules):
            factor = float(res.clip_factors[i, m])
            if i in kept and factor != 1.0:
                screening.clip[f"{c}|{name}"] = factor
    return screening


def relative_clip(rt: Runtime, records: Mapping[str, DeltaRecord], clients: list[str], k: float) -> dict[str, float]:
    """Clip factors ("client|module", only those below 1) capping each client at ``k`` x the round's median.

    The norms are the ones ingest computed (r x r Grams) into each accepted delta's index, which
    the workers wrote and hashed: no tensor is read.
    """
    indexes = {c: load_index(rt, records[c]) for c in clients}
    modules = sorted({m for c in clients for m in indexes[c].modules})
    # built and read as Python lists: per-element tensor indexing costs seconds at 70B shapes (560 modules x 100)
    rows = [[_norm(indexes[c].modules.get(name)) for c in clients] for name in modules]
    factors = relative_clip_factors(torch.tensor(rows, dtype=torch.float64).reshape(len(modules), len(clients)), k)
    values = factors.tolist()
    return {
        f"{c}|{name}": values[m][i]
        for i, c in enumerate(clients)
        for m, name in enumerate(modules)
        if values[m][i] != 1.0
    }


def _norm(entry: ModuleEntry | None) -> float:
    return math.nan if entry is None else entry.norm
