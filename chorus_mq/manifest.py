"""A round's manifest: what the commit task writes last (the commit marker) and ``pull`` reads first.

One type for the writer and the reader. Its sha256 is recorded in Redis when the round is
finalized, so a reader verifies the manifest before trusting the object hashes it lists.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidAdapter
from .names import MANIFEST_FORMAT, Factor


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
    #: the client's label histogram of its training data, as it declared it (label -> examples)
    label_counts: dict[str, int] | None = None
    #: cosine of the client's update to the round's exact aggregate over the whole adapter; None when not
    #: computed (a DP round, an excluded client, a zero update)
    cosine: float | None = None
    #: the client's evaluation of the global model it started from (round, loss, accuracy, examples)
    global_eval: dict[str, Any] | None = None
    #: buffered flushes: the version the delta was trained from, and how many versions behind the one the
    #: flush moved (None in synchronous rounds)
    base_version: int | None = None
    staleness: int | None = None


@dataclass(frozen=True)
class EvalSummary:
    """The example-weighted mean of the evaluations clients reported of one round's global model."""

    round: int
    loss: float
    #: over the reports that have an accuracy (None: none has)
    accuracy: float | None
    examples: int
    clients: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalSummary:
        accuracy = d.get("accuracy")
        return cls(
            round=int(d["round"]),
            loss=float(d["loss"]),
            accuracy=None if accuracy is None else float(accuracy),
            examples=int(d["examples"]),
            clients=int(d["clients"]),
        )


def mean_eval(reports: Iterable[Mapping[str, Any] | None]) -> EvalSummary | None:
    """The mean of the reports of the latest round any of them evaluated, weighted by their examples
    (a client that started from an older round reported another model); None without reports."""
    given = [r for r in reports if r]
    if not given:
        return None
    latest = max(int(r["round"]) for r in given)
    mine = [r for r in given if int(r["round"]) == latest]
    examples = sum(int(r["examples"]) for r in mine)
    scored = [r for r in mine if r.get("accuracy") is not None]
    scored_examples = sum(int(r["examples"]) for r in scored)
    return EvalSummary(
        round=latest,
        loss=math.fsum(float(r["loss"]) * int(r["examples"]) for r in mine) / examples,
        accuracy=(
            math.fsum(float(r["accuracy"]) * int(r["examples"]) for r in scored) / scored_examples if scored else None
        ),
        examples=examples,
        clients=len(mine),
    )


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

    #: the server optimiser's state for the shard's items (with ``--server-opt`` only; collected once a
    #: later round completes: only the next round reads it)
    opt_state: ObjectRef | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardEntry:
        residual, variate, state = d.get("residual"), d.get("variate"), d.get("opt_state")
        return cls(
            index=int(d["index"]),
            first=str(d["first"]),
            last=str(d["last"]),
            items=int(d["items"]),
            adapter=ObjectRef.from_dict(d["adapter"]),
            residual=None if residual is None else ObjectRef.from_dict(residual),
            variate=None if variate is None else ObjectRef.from_dict(variate),
            opt_state=None if state is None else ObjectRef.from_dict(state),
        )


@dataclass(frozen=True)
class FrameRef:
    """Where a round's frozen shared factors lie (``factors``: Fed-SB's ``lora_A`` and ``lora_B``, ffa-lora's
    ``lora_A``, the one rolora froze this round): the adapter objects of the round that last wrote them, of
    which readers take those factors' tensors only. A round that refers to them stores only what it trained
    (and the head), never the frozen factors again."""

    round: int
    shards: tuple[ShardEntry, ...]
    #: the factors (``Factor`` values) readers take from these objects; absent from manifests written before
    #: other strategies than Fed-SB referred to a frame: both
    factors: tuple[str, ...] = (Factor.LORA_A.value, Factor.LORA_B.value)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameRef:
        factors = tuple(str(Factor(f)) for f in d.get("factors", (Factor.LORA_A, Factor.LORA_B)))
        return cls(round=int(d["round"]), shards=tuple(ShardEntry.from_dict(s) for s in d["shards"]), factors=factors)

    @property
    def identity(self) -> str:
        """One name for the objects' bytes (their hashes): equal identities hold the same tensors."""
        joined = "\0".join(s.adapter.sha256 for s in self.shards)
        return hashlib.sha256(f"fed-sb-frame\0{joined}".encode()).hexdigest()


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
    #: the mean of the evaluations this round's clients reported of the global model they started from
    global_eval: EvalSummary | None = None
    #: the server optimiser's settings and ``previous_round``, the round whose global it stepped from
    #: (None: no server optimiser)
    server_opt: dict[str, Any] | None = None
    #: buffered flushes: ``previous_version`` (the version the flush moved), ``server_lr`` (η) and
    #: ``staleness_weight`` (g); None: a synchronous round
    buffered: dict[str, Any] | None = None
    #: secure rounds: ``summed`` (the clients whose masked inputs the published sum holds), ``dropped``
    #: (client -> the phase it fell silent in, or why it was left out), ``weights`` (published at the open)
    secure: dict[str, Any] | None = None
    #: linear strategies' rounds after round 0: where the factors this round froze lie, in the objects of the
    #: round that last wrote them (its own shards then hold the trained factor and the head only); None: the
    #: shards hold everything (the other strategies, round 0, and rounds written before rounds referred to
    #: their frozen factors)
    frame: FrameRef | None = None
    format: str = MANIFEST_FORMAT

    def frame_source(self, factors: Iterable[str] = (Factor.LORA_A, Factor.LORA_B)) -> FrameRef:
        """Where this round's ``factors`` lie: the frame it refers to when that holds them, else its own adapter
        objects (InvalidAdapter when the frame holds some of them only)."""
        wanted = tuple(str(Factor(f)) for f in factors)
        if self.frame is not None and set(wanted) & set(self.frame.factors):
            if not set(wanted) <= set(self.frame.factors):
                raise InvalidAdapter(
                    f"round {self.round} refers to its {list(self.frame.factors)} only, not to {list(wanted)}"
                )
            return FrameRef(self.frame.round, self.frame.shards, wanted)
        own = tuple(ShardEntry(s.index, s.first, s.last, s.items, s.adapter, None) for s in self.shards)
        return FrameRef(self.round, own, wanted)

    def to_json(self) -> bytes:
        d = asdict(self)
        # without a server optimiser a manifest is byte-identical to one written before it existed
        if d["server_opt"] is None:
            del d["server_opt"]
        if d["buffered"] is None:
            del d["buffered"]
        if d["secure"] is None:
            del d["secure"]
        if d["frame"] is None:
            del d["frame"]
        else:
            for shard in d["frame"]["shards"]:
                for name in ("residual", "variate", "opt_state"):
                    del shard[name]  # the frame is an adapter object's tensors only
        for client in d["clients"]:
            for name in ("base_version", "staleness"):
                if client[name] is None:
                    del client[name]
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
                variate_clipped={k: float(v) for k, v in (d.get("variate_clipped") or {}).items()},
                global_eval=None if d.get("global_eval") is None else EvalSummary.from_dict(d["global_eval"]),
                server_opt=None if d.get("server_opt") is None else dict(d["server_opt"]),
                buffered=None if d.get("buffered") is None else dict(d["buffered"]),
                secure=None if d.get("secure") is None else dict(d["secure"]),
                frame=None if d.get("frame") is None else FrameRef.from_dict(d["frame"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidAdapter(f"malformed manifest: {exc}") from None
