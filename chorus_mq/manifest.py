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
    #: the server optimiser's state for the shard's items (with ``--server-opt`` only; collected once a
    #: later round completes: only the next round reads it)
    opt_state: ObjectRef | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        residual, state = d.get("residual"), d.get("opt_state")
        return cls(
            index=int(d["index"]),
            first=str(d["first"]),
            last=str(d["last"]),
            items=int(d["items"]),
            adapter=ObjectRef.from_dict(d["adapter"]),
            residual=None if residual is None else ObjectRef.from_dict(residual),
            opt_state=None if state is None else ObjectRef.from_dict(state),
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
    #: the server optimiser's settings and ``previous_round``, the round whose global it stepped from
    #: (None: no server optimiser)
    server_opt: dict[str, Any] | None = None
    format: str = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        d = asdict(self)
        # without a server optimiser a manifest is byte-identical to one written before it existed
        if d["server_opt"] is None:
            del d["server_opt"]
        for shard in d["shards"]:
            if shard["opt_state"] is None:
                del shard["opt_state"]
        return json.dumps(d, indent=2, sort_keys=True).encode()

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
                server_opt=None if d.get("server_opt") is None else dict(d["server_opt"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidAdapter(f"malformed manifest: {exc}") from None
