"""What a round, a delta, a snapshot and a client look like once read back from Redis."""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, StateCorrupt
from ..ids import check_name
from ..names import ENDED_STATES, CloseReason, RoundStatus, SnapshotDtype
from .protocol import decode_fields

_HEX = frozenset("0123456789abcdef")


#: a buffered client's k-th delta in one buffer (k >= 2, ``--max-per-client-per-flush``) is registered under the
#: term ``client#k`` (its first under ``client``): '#' is in no client id, so a term names its client
TERM_SEP = "#"


def term_key(client: str, k: int) -> str:
    """The term under which ``client``'s ``k``-th delta of a round is registered (k counts from 1)."""
    return client if k == 1 else f"{client}{TERM_SEP}{k}"


def term_client(term: str) -> str:
    """The client a registered term (``client`` or ``client#k``) belongs to."""
    return term.split(TERM_SEP, 1)[0]


def _check_sha(value: str, what: str) -> None:
    if len(value) != 64 or not set(value) <= _HEX:
        raise ConfigError(f"{what} must be 64 lowercase hex digits, got {value!r}")


def _finite_positive(value: float | None, what: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a finite number above 0, got {value!r}")


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _loads(raw: str | builtins.bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise StateCorrupt(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise StateCorrupt(f"{what} is not a JSON object")
    return obj


@dataclass(frozen=True)
class ManifestRef:
    """A committed object and the sha256 recorded with it (e.g. a federation's initial adapter)."""

    key: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.key:
            raise ConfigError("a manifest reference needs an object key")
        _check_sha(self.sha256, "manifest sha256")


@dataclass(frozen=True)
class RoundInfo:
    """One round hash, typed. Times are unix seconds; 0 / None where the round never got there."""

    round: int
    state: RoundStatus
    epoch: int = 0
    n: int = 0
    quorum: int = 0
    min_quorum: int = 0
    opened_at: float = 0.0
    deadline: float = 0.0  # 0: no deadline
    #: the clients drawn for this round; empty: every registered client may take part
    selected: tuple[str, ...] = ()
    closed_by: CloseReason | None = None
    agg_started: float | None = None
    lease_until: float | None = None
    #: how many shards the round's aggregation was split into (0 until the first one is done)
    shards: int = 0
    manifest: str = ""
    manifest_sha256: str = ""
    completed_at: float | None = None
    failed_at: float | None = None
    closed_at: float | None = None
    aborted_at: float | None = None
    reason: str = ""
    extensions: int = 0
    reclaims: int = 0
    lease_extensions: int = 0
    #: how often the sweep re-sent an epoch's missing tasks (a lost message) before any reclaim
    resends: int = 0
    #: the factor this round's clients train (``lora_A``/``lora_B``) under a strategy that freezes a shared
    #: factor (chorus_mq/strategy.py); "": both
    trainable: str = ""
    #: term (the client, or ``client#k`` for its k-th delta in a buffer) -> sha256 of the registered delta
    shas: Mapping[str, str] = field(default_factory=dict)
    #: client -> sha256 of a delta the operator evicted from this round (it cannot come back)
    evicted: Mapping[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def effective_min_quorum(self) -> int:
        return self.min_quorum or self.quorum

    @property
    def clients(self) -> list[str]:
        """The clients registered in this round, sorted (each once, however many deltas it has here)."""
        return sorted({term_client(t) for t in self.shas})

    def shas_of(self, client: str) -> list[str]:
        """The sha256 of every delta ``client`` has registered in this round (by term)."""
        return [sha for term, sha in sorted(self.shas.items()) if term_client(term) == client]

    @classmethod
    def from_hash(cls, r: int, h: Mapping[str, str]) -> RoundInfo:
        """Parse a round hash as the scripts write it."""
        shas = {k[4:]: v for k, v in h.items() if k.startswith("sha:")}
        evicted = {k[8:]: v for k, v in h.items() if k.startswith("evicted:")}
        plain = {k: v for k, v in h.items() if ":" not in k and k not in ("round", "shas", "evicted")}
        if "state" not in plain:
            raise StateCorrupt(f"round {r} has no state field")
        kw = decode_fields(cls, plain, where=f"round {r}")
        return cls(round=r, shas=shas, evicted=evicted, **kw)


@dataclass(frozen=True)
class DeltaRecord:
    """One accepted delta as registered in ``round:{r}:deltas`` (written by the ingest worker)."""

    client_id: str
    sha256: str
    size: int
    upload_id: str
    key: str
    index_key: str
    index_sha256: str
    dataset_size: float | None = None
    ts: float = 0.0
    modules: int = 0
    #: hex bitmap over the federation's declared modules, sorted by name
    present: str = ""
    rank: int | None = None
    ranks: tuple[int, ...] | None = None
    bytes: int = 0
    max_norm: float = 0.0
    #: the client's own DP report (from the signed message)
    dp: Mapping[str, Any] | None = None
    #: SCAFFOLD: the learning rate summed over the client's local steps (from the signed message)
    lr_sum: float | None = None
    #: the client's label histogram of its training data, as it declared it (label -> examples)
    label_counts: Mapping[str, int] | None = None
    #: the client's evaluation of the global model it started from: round, loss, accuracy, examples
    global_eval: Mapping[str, Any] | None = None
    #: buffered federations: the version the delta was trained from (from the signed message)
    base_version: int | None = None

    def __post_init__(self) -> None:
        check_name(self.client_id, "client id")
        if self.base_version is not None and (
            isinstance(self.base_version, bool) or not isinstance(self.base_version, int) or self.base_version < 0
        ):
            raise ConfigError(f"base version must be an int >= 0, got {self.base_version!r}")
        _check_sha(self.sha256, "delta sha256")
        _check_sha(self.index_sha256, "index sha256")
        _finite_positive(self.dataset_size, "dataset size")
        _finite_positive(self.lr_sum, "lr_sum")
        if self.size < 0 or self.bytes < 0 or self.modules < 0:
            raise ConfigError("delta size, tensor bytes and module count cannot be negative")
        if not set(self.present) <= _HEX:
            raise ConfigError(f"present must be a hex bitmap, got {self.present!r}")
        if not self.upload_id or not self.key or not self.index_key:
            raise ConfigError("a delta record needs an upload id, an object key and an index key")
        if isinstance(self.ranks, list):
            object.__setattr__(self, "ranks", tuple(self.ranks))

    def to_json(self) -> str:
        """The record as stored (compact, sorted keys)."""
        body = asdict(self)
        body["ranks"] = None if self.ranks is None else list(self.ranks)
        for name in ("dp", "label_counts", "global_eval"):
            value = getattr(self, name)
            body[name] = None if value is None else dict(value)
        return _dumps(body)

    @classmethod
    def from_json(cls, raw: str | builtins.bytes) -> DeltaRecord:
        """Parse a stored record; anything malformed is :class:`StateCorrupt`."""
        body = _loads(raw, "delta record")
        try:
            if body.get("ranks") is not None:
                body["ranks"] = tuple(int(x) for x in body["ranks"])
            return cls(**body)
        except (TypeError, ValueError, ConfigError) as exc:
            raise StateCorrupt(f"delta record {str(raw)[:200]!r} is malformed: {exc}") from None


@dataclass(frozen=True)
class SnapshotRecord:
    """A compacted cumulative correction (Σ residuals of rounds ≤ ``round``), written by the compaction task."""

    round: int
    key: str
    sha256: str
    size: int
    dtype: SnapshotDtype = SnapshotDtype.FLOAT32
    #: the earlier snapshot this one was folded from (None: from round 1), and how many increments it added
    base: int | None = None
    rounds: int = 0
    created_at: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, SnapshotDtype):
            try:
                object.__setattr__(self, "dtype", SnapshotDtype(self.dtype))
            except ValueError:
                raise ConfigError(f"snapshot dtype must be one of {', '.join(SnapshotDtype.values())}") from None
        _check_sha(self.sha256, "snapshot sha256")
        if self.round < 0 or self.size < 0 or self.rounds < 0 or not self.key:
            raise ConfigError("a snapshot needs a round >= 0, a size >= 0, a count of rounds >= 0 and an object key")
        if self.base is not None and not 0 <= self.base < self.round:
            raise ConfigError(f"a snapshot of round {self.round} cannot build on round {self.base}")

    def to_json(self) -> str:
        return _dumps({**asdict(self), "dtype": self.dtype.value})

    @classmethod
    def from_json(cls, raw: str | builtins.bytes) -> SnapshotRecord:
        body = _loads(raw, "snapshot record")
        try:
            return cls(**body)
        except (TypeError, ValueError, ConfigError) as exc:
            raise StateCorrupt(f"snapshot record {str(raw)[:200]!r} is malformed: {exc}") from None


@dataclass(frozen=True)
class ClientInfo:
    """A registered client as the operator sees it (the secret is never part of it)."""

    client_id: str
    created_at: float
    revoked: bool = False
    revoked_at: float | None = None
    #: the operator's registered weight / dataset size (``--weights registered``); None: not set
    weight: float | None = None
    dataset_size: float | None = None

    @property
    def active(self) -> bool:
        return not self.revoked
