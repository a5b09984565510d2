"""Seeing drift in a round: each client's cosine to the aggregate (shards), and what clients reported (commit).

A shard adds each module's inner products (``aggregation.drift``) to one additive sum it reports
with its result; the commit sums the shards in index order and records one cosine per client in
the manifest, next to the label counts and the evaluation each client reported with its upload.
Not under differential privacy: a per-client statistic of the updates is not part of the release
the noise protects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..aggregation import ClientUpdate
from ..aggregation.drift import AlignmentSums, ModuleAlignment, combine, module_alignment
from ..errors import ChorusError
from ..manifest import ClientEntry, EvalSummary, mean_eval
from ..state.rounds import DeltaRecord

log = logging.getLogger(__name__)
#: cosines are recorded to this many decimals (float sums over modules differ in the last bits across hosts)
_DECIMALS = 6


def alignment(module: str, updates: Sequence[ClientUpdate], absent_weight: float) -> ModuleAlignment | None:
    """One module's part of the cosines, from the updates the engine aggregates (clipped where the plan
    clips). A diagnostic never fails a round: on an error the module has no part, and the log says why."""
    try:
        return module_alignment(updates, absent_weight=absent_weight)
    except (ChorusError, RuntimeError) as exc:
        log.warning("no cosines for module %s: %s", module, exc)
        return None


def shard_sums(parts: Iterable[tuple[Sequence[str], ModuleAlignment | None]]) -> dict[str, Any] | None:
    """A shard's sums over its modules (holders, part), in order; None when no module had a part."""
    sums, any_part = AlignmentSums(), False
    for holders, part in parts:
        if part is not None:
            sums.add(holders, part)
            any_part = True
    return sums.to_dict() if any_part else None


def round_cosines(shards: Iterable[Mapping[str, Any] | None]) -> dict[str, float | None]:
    """Each client's adapter-wide cosine to the aggregate, from the shards' sums in index order."""
    parts = [AlignmentSums.from_dict(s) for s in shards if s is not None]
    if not parts:
        return {}
    return {c: None if v is None else round(v, _DECIMALS) for c, v in combine(parts).cosines().items()}


def client_entries(
    records: Mapping[str, DeltaRecord], weights: Mapping[str, float], cosines: Mapping[str, float | None]
) -> tuple[ClientEntry, ...]:
    """The manifest's clients: who sent what with which weight, and what each reported and how it aligned; one
    entry per delta, in ``records``' order (a buffered client with several deltas in a flush has one per term)."""
    return tuple(
        ClientEntry(
            client_id=rec.client_id,
            sha256=rec.sha256,
            dataset_size=rec.dataset_size,
            weight=weights.get(c, 0.0),
            label_counts=None if rec.label_counts is None else dict(rec.label_counts),
            cosine=cosines.get(c),
            global_eval=None if rec.global_eval is None else dict(rec.global_eval),
        )
        for c, rec in records.items()
    )


def reported_eval(records: Mapping[str, DeltaRecord]) -> EvalSummary | None:
    """The example-weighted mean of the global evaluations the round's clients reported."""
    return mean_eval(rec.global_eval for rec in records.values())
