"""What the SDK returns: a federation's status, a round's summary, an upload's result, a new client's
credentials; and the privacy each client spent (server-side DP).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..manifest import EvalSummary, Manifest, mean_eval
from ..names import RoundStatus
from ..state import FederationConfig
from ..state.records import TERM_SEP, term_client
from ..state.rounds import DeltaRecord, RoundInfo

T = TypeVar("T")


@dataclass(frozen=True)
class UploadResult:
    federation: str
    client_id: str
    upload_id: str
    sha256: str
    object_key: str
    round: int | None
    status: str  # queued (no wait) | accepted | duplicate | fired
    n: int | None = None
    bytes: int = 0


@dataclass(frozen=True)
class Status:
    """A federation at a glance: its settings, the current round, and what clients spent."""

    federation: str
    base_model: str
    strategy: str
    quorum: int
    min_quorum: int
    round_timeout: int
    current_round: int
    state: RoundStatus
    deltas: int
    deadline: float | None
    latest_complete: int | None
    task_type: str | None = None
    labels: tuple[str, ...] = ()
    clients_per_round: int = 0
    selected: tuple[str, ...] = ()
    #: server-side client-level DP: epsilon spent per client (composed over the rounds it took part in)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    #: client-side DP: the latest cumulative epsilon each client reported with its upload
    client_dp: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: inbox records dropped as unauthenticated or malformed, by reason code
    rejected: dict[str, int] = field(default_factory=dict)
    #: FedProx weight the federation asks its clients to train with
    prox_mu: float = 0.0
    #: SCAFFOLD: every client corrects its local steps by the round's server variate and declares its lr_sum
    scaffold: bool = False
    #: each client keeps its own task head (``federation create --personal-heads``)
    personal_heads: bool = False
    #: the latest complete round (with its clients' cosines to the aggregate) and the current round, if it
    #: differs: what each client declared and reported with its upload (see :class:`RoundSummary`)
    recent_rounds: tuple[RoundSummary, ...] = ()
    #: what status could not show, and why (e.g. the latest manifest could not be read)
    warnings: tuple[str, ...] = ()
    #: the server optimiser on each round's exact update and the settings it uses (``optimizer``, ``lr``,
    #: ...; empty when there is none)
    server_opt: dict[str, Any] = field(default_factory=dict)
    #: sync or buffered; buffered: a round is a buffer (version), ``quorum`` its size K, and ``buffered`` the
    #: flush settings (max_staleness, staleness_weight, server_lr, max_per_client_per_flush)
    mode: str = "sync"
    buffered: dict[str, Any] = field(default_factory=dict)
    #: the factor the current round's clients train (``lora_B``, ``lora_A``; ffa-lora, rolora: the other is
    #: frozen and must be uploaded bit-identical to the one published); None: both
    trainable: str | None = None
    #: ``--secure-aggregation``: K, T and the phase timeout as configured (0: the default for the cohort), and
    #: the current round's secure aggregation (``phase``, ``epoch``, ``deadline``, ``survivors``, and what
    #: was published when it opened: ``cohort``, ``neighbours``, ``threshold``, ``weights``, ...); {}: not secure
    secure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RoundSummary:
    """One round, as ``rounds`` lists it."""

    round: int
    state: RoundStatus
    n: int
    clients: tuple[str, ...]
    opened_at: float | None = None
    completed_at: float | None = None
    manifest: str | None = None
    reason: str | None = None
    selected: tuple[str, ...] = ()
    #: when its (latest) aggregation started: open -> this is waiting for uploads, this -> complete is the work
    aggregation_started_at: float | None = None
    #: each client's label histogram of its training data, as it declared it with its upload
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: each client's evaluation of the global model it started from (round, loss, accuracy, examples)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: their example-weighted mean (over the reports of the latest round evaluated)
    global_eval: EvalSummary | None = None
    #: each client's cosine to the round's aggregate, from its manifest (None: not read, or not complete)
    cosine: dict[str, float | None] | None = None
    #: the factor this round's clients train (``lora_B``, ``lora_A``; ffa-lora, rolora); None: both
    trainable: str | None = None
    #: buffered, ``--max-per-client-per-flush`` > 1: how many deltas each client with more than one has in the
    #: buffer (``clients`` names each client once; ``n`` counts deltas)
    deltas_per_client: dict[str, int] = field(default_factory=dict)

    @property
    def waited(self) -> float | None:
        """Seconds from opening to the start of aggregation (waiting for the quorum or the deadline)."""
        return _span(self.opened_at, self.aggregation_started_at)

    @property
    def aggregated(self) -> float | None:
        """Seconds from the start of aggregation to the commit (the workers' time, reclaims included)."""
        return _span(self.aggregation_started_at, self.completed_at)

    @classmethod
    def of(cls, info: RoundInfo, records: Mapping[str, DeltaRecord], manifest: Manifest | None = None) -> RoundSummary:
        """The round as its hash and its delta records say, with the cosines of its ``manifest`` when given.
        Keyed by client, never by a buffered client's internal term names: a client with several deltas in one
        buffer shows its latest delta's declarations and the weight-weighted mean of its deltas' cosines."""
        latest = per_client(records)
        counts = Counter(term_client(t) for t in records)
        return cls(
            round=info.round,
            state=RoundStatus(info.state),
            n=info.n,
            clients=tuple(latest),
            label_counts={c: dict(rec.label_counts) for c, rec in latest.items() if rec.label_counts},
            evals={c: dict(rec.global_eval) for c, rec in latest.items() if rec.global_eval},
            global_eval=mean_eval(rec.global_eval for rec in records.values()),
            cosine=None if manifest is None else client_cosines(manifest),
            aggregation_started_at=info.agg_started,
            opened_at=info.opened_at,
            completed_at=info.completed_at,
            manifest=info.manifest,
            reason=info.reason,
            selected=info.selected,
            trainable=info.trainable or None,
            deltas_per_client={c: k for c, k in sorted(counts.items()) if k > 1},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClientCredentials:
    """What ``client add`` hands to a new client, once."""

    federation: str
    client_id: str
    secret: str
    redis_username: str | None
    redis_url: str | None


def privacy_spent(
    cfg: FederationConfig, history: list[RoundInfo], deltas: Mapping[int, Iterable[str]]
) -> dict[str, dict[str, float]]:
    """Per client, the accountant's epsilon over the complete rounds of ``history`` it has a delta in."""
    from ..aggregation.dp import PrivacyAccountant

    rounds: dict[str, int] = {}
    for info in history:
        if info.state == RoundStatus.COMPLETE:
            # a buffered client's several deltas in one flush (its terms) are one participation
            for client in {term_client(t) for t in deltas[info.round]}:
                rounds[client] = rounds.get(client, 0) + 1
    out = {}
    for client, k in rounds.items():
        acc = PrivacyAccountant()
        acc.spend(cfg.dp_noise_multiplier, rounds=k)
        out[client] = {"epsilon": acc.epsilon(cfg.dp_delta), "delta": cfg.dp_delta, "rounds": float(k)}
    return out


def per_client(records: Mapping[str, T]) -> dict[str, T]:
    """``records`` keyed by registered term (``client``, ``client#k``), re-keyed by client in name order: each
    client's latest term (highest ``k``)."""
    latest: dict[str, tuple[int, T]] = {}
    for term, value in records.items():
        client, _, k = term.partition(TERM_SEP)
        order = int(k) if k else 1
        if client not in latest or order > latest[client][0]:
            latest[client] = (order, value)
    return {c: latest[c][1] for c in sorted(latest)}


def client_cosines(manifest: Manifest) -> dict[str, float | None]:
    """Each client's cosine to the round's aggregate: a buffered client with several deltas in the flush (one
    manifest entry each) gets their weight-weighted mean; None where none of its entries has one."""
    sums: dict[str, tuple[float, float]] = {}
    for entry in manifest.clients:
        total, weight = sums.get(entry.client_id, (0.0, 0.0))
        if entry.cosine is not None:
            w = entry.weight if entry.weight > 0 else 1.0
            total, weight = total + w * entry.cosine, weight + w
        sums[entry.client_id] = (total, weight)
    return {c: (total / weight if weight else None) for c, (total, weight) in sums.items()}


def _span(start: float | None, end: float | None) -> float | None:
    return end - start if start and end else None
