"""A round's plan: who counts with which weight and how the modules are sharded, fixed once it is made.

``plan.py`` makes it; shards, the commit, buffered flushes, variates and the server step read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..manifest import ObjectRef
from ..names import MissingModules, Strategy


@dataclass(frozen=True)
class Plan:
    """Everything a shard or the commit needs to know about a round, fixed once."""

    clients: tuple[str, ...]  # kept clients, sorted
    weights: dict[str, float]  # normalised over the kept clients
    items: tuple[str, ...]  # modules present in some delta, and the declared extras, sorted
    extras: tuple[str, ...]  # which items are extras (modules_to_save tensors)
    shards: tuple[tuple[int, int], ...]  # contiguous [start, end) ranges over items
    strategy: Strategy
    missing: MissingModules
    out_rank: int
    template: dict[str, Any]  # the first kept client's PEFT config: layout, task, modules_to_save
    excluded: dict[str, str] = field(default_factory=dict)
    #: "client|module" -> factor below 1; a buffered flush's are on each delta's update against its own base
    #: version and live in the weights (``flush.holder_weights``), a synchronous round's scale the upload
    clip: dict[str, float] = field(default_factory=dict)
    dp: bool = False
    #: SCAFFOLD: |S|/N, the share of the federation's clients this round's variate updates stand for; 0: off
    variate_fraction: float = 0.0
    #: ``--personal-heads``: round 0's adapter objects holding the head every round publishes unchanged (the
    #: clients keep their own and upload none); empty: the extras are the weighted mean of the deltas'
    heads: tuple[ObjectRef, ...] = ()
    #: with a server optimiser: the complete round whose published global (and optimiser state) this round
    #: steps from, the latest complete round when it was planned; None: none (or no optimiser)
    previous: int | None = None
    #: buffered flushes (``workers/flush.py``): each client's base version and staleness against ``previous``
    #: (the version the flush moves), and η; ``flush_lr`` 0: a synchronous round
    bases: dict[str, int] = field(default_factory=dict)
    staleness: dict[str, int] = field(default_factory=dict)
    flush_lr: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Plan:
        d = json.loads(raw)
        return cls(
            clients=tuple(d["clients"]),
            weights=dict(d["weights"]),
            items=tuple(d["items"]),
            extras=tuple(d["extras"]),
            shards=tuple((int(a), int(b)) for a, b in d["shards"]),
            strategy=Strategy(d["strategy"]),
            missing=MissingModules(d["missing"]),
            out_rank=int(d["out_rank"]),
            template=dict(d["template"]),
            excluded=dict(d["excluded"]),
            clip=dict(d["clip"]),
            dp=bool(d["dp"]),
            variate_fraction=float(d.get("variate_fraction", 0.0)),
            heads=tuple(ObjectRef.from_dict(h) for h in d.get("heads", ())),
            previous=None if d.get("previous") is None else int(d["previous"]),
            bases={c: int(v) for c, v in (d.get("bases") or {}).items()},
            staleness={c: int(v) for c, v in (d.get("staleness") or {}).items()},
            flush_lr=float(d.get("flush_lr", 0.0)),
        )

    def shard_items(self, k: int) -> tuple[str, ...]:
        start, end = self.shards[k]
        return self.items[start:end]
