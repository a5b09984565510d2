"""A round's manifest: what the commit task writes last (the commit marker) and ``pull`` reads first.

One type for the writer and the reader. Its sha256 is recorded in Redis when the round is
finalized, so a reader verifies the manifest before trusting the object hashes it lists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidAdapter
from .names import MANIFEST_FORMAT


@dataclass(frozen=True)
class ObjectRef:
    """An object in the store and the hash it must have."""

    key: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectRef:
        return cls(key=str(d["key"]), sha256=str(d["sha256"]), size=int(d["size"]))


@dataclass(frozen=True)
class ClientEntry:
    client_id: str
    sha256: str
    dataset_size: float | None
    weight: float


@dataclass(frozen=True)
class ShardEntry:
    """One shard's outputs; shards in index order hold the round's modules in name order."""

    index: int
    first: str
    last: str
    items: int
    adapter: ObjectRef
    residual: ObjectRef | None
    #: SCAFFOLD: the server variate of this shard's items (the adapter's keys and shapes)
    variate: ObjectRef | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        residual, variate = d.get("residual"), d.get("variate")
        return cls(
            index=int(d["index"]),
            first=str(d["first"]),
            last=str(d["last"]),
            items=int(d["items"]),
            adapter=ObjectRef.from_dict(d["adapter"]),
            residual=None if residual is None else ObjectRef.from_dict(residual),
            variate=None if variate is None else ObjectRef.from_dict(variate),
        )


@dataclass(frozen=True)
class Manifest:
    federation: str
    round: int
    epoch: int
    strategy: str
    base_model: str
    #: the global adapter's PEFT config (``adapter_config.json``), inline
    adapter_config: dict[str, Any]
    clients: tuple[ClientEntry, ...]
    shards: tuple[ShardEntry, ...]
    excluded: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    dp: dict[str, Any] | None = None
    selected: tuple[str, ...] = ()
    modules: int = 0
    adapter_bytes: int = 0
    residual_bytes: int = 0
    #: seconds: quorum_to_commit, fetch, math, write, commit (phases summed over shards)
    timings: dict[str, float] = field(default_factory=dict)
    #: SCAFFOLD: "client|item" -> the factor a client's variate update was clipped by (only those below 1)
    variate_clipped: dict[str, float] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            d = json.loads(raw)
            if d.get("format") != MANIFEST_FORMAT:
                raise InvalidAdapter(f"manifest format is {d.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            return cls(
                federation=str(d["federation"]),
                round=int(d["round"]),
                epoch=int(d["epoch"]),
                strategy=str(d["strategy"]),
                base_model=str(d["base_model"]),
                adapter_config=dict(d["adapter_config"]),
                clients=tuple(ClientEntry(**c) for c in d["clients"]),
                shards=tuple(ShardEntry.from_dict(s) for s in d["shards"]),
                excluded=dict(d.get("excluded") or {}),
                clipped=dict(d.get("clipped") or {}),
                dp=d.get("dp"),
                selected=tuple(d.get("selected") or ()),
                modules=int(d.get("modules", 0)),
                adapter_bytes=int(d.get("adapter_bytes", 0)),
                residual_bytes=int(d.get("residual_bytes", 0)),
                timings={k: float(v) for k, v in (d.get("timings") or {}).items()},
                variate_clipped={k: float(v) for k, v in (d.get("variate_clipped") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidAdapter(f"malformed manifest: {exc}") from None
