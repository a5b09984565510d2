"""The Python SDK. The CLI is a thin layer over it; ``simulate`` and ``train`` drive it too.

A client talks to Redis (its federation's public state and events, and its inbox: a
data-only stream it may only append to) and to object storage (its own upload prefix, and
the round results it pulls). Operators use the same class with operator credentials to
create federations and manage clients. Read-only paths import no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from .errors import (
    AuthError,
    ChorusError,
    ConfigError,
    InvalidAdapter,
    InvalidReport,
    NotFound,
    ObjectExists,
    Rejected,
    RoundClosed,
    RoundFailed,
    ServiceUnavailable,
    Timeout,
    TooLarge,
)
from .ids import check_name
from .layout import delta_key
from .manifest import EvalSummary, Manifest, mean_eval
from .messages import ClientDP, GlobalEval, IngestMessage
from .names import ENDED_STATES, EventType, RoundStatus, ScriptStatus, Task
from .progress import byte_bar
from .settings import Settings
from .state import FederationConfig, FederationKeys, RoundState
from .state.clients import ClientRegistry
from .state.events import Event
from .state.inbox import Inbox
from .state.redis_keys import parse_client_username
from .state.rounds import DeltaRecord, RevokedDelta, RoundInfo
from .store import Store, open_store

if TYPE_CHECKING:
    from .adapters import ModelDecl
    from .secure_upload import SecureResult


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
        """The round as its hash and its delta records say, with the cosines of its ``manifest`` when given."""
        return cls(
            round=info.round,
            state=RoundStatus(info.state),
            n=info.n,
            clients=tuple(sorted(records)),
            label_counts={c: dict(rec.label_counts) for c, rec in sorted(records.items()) if rec.label_counts},
            evals={c: dict(rec.global_eval) for c, rec in sorted(records.items()) if rec.global_eval},
            global_eval=mean_eval(rec.global_eval for rec in records.values()),
            cosine=None if manifest is None else {c.client_id: c.cosine for c in manifest.clients},
            aggregation_started_at=info.agg_started,
            opened_at=info.opened_at,
            completed_at=info.completed_at,
            manifest=info.manifest,
            reason=info.reason,
            selected=info.selected,
            trainable=info.trainable or None,
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


class ChorusClient:
    """Talk to a chorus-mq deployment: Redis for state, events and the inbox; object storage for tensors."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: redis_lib.Redis | None = None,
        store: Store | None = None,
        secret: str | None = None,
    ):
        self.settings = settings or Settings()  # read from the environment now, not a cached copy
        self.redis = redis or redis_lib.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self._store = store
        self.state = RoundState(self.redis, maxlen=self.settings.events_maxlen, lease_s=self.settings.aggregation_lease)
        self.secret = secret or self.settings.client_secret or _url_password(self.settings.redis_url)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.store, self.settings)
        return self._store

    # -- federations and rounds (operators) ------------------------------------------------

    def create_federation(
        self,
        config: FederationConfig,
        *,
        model: ModelDecl,
        initial_adapter: str | Path | None = None,
        selection_seed: str | None = None,
    ) -> FederationConfig:
        """Create a federation that knows its model (module shapes, task head), optionally with an initial
        adapter published as round 0 (every client's round 1 starts from it). ``selection_seed`` fixes the
        workers' draw of clients per round (secret and random by default: set it only where reproducible
        draws matter more than unpredictable ones, as in a simulation)."""
        from .federation import create

        return create(self, config, model=model, initial_adapter=initial_adapter, selection_seed=selection_seed)

    def status(self, federation: str) -> Status:
        """The federation's settings, its current round and the privacy its clients spent."""
        with _service(self.settings):
            meta = self.state.meta(federation)
            cfg = FederationConfig.from_hash(meta)
            current = int(meta["current_round"])
            rnd = self.state.round(federation, current)
            history = self.state.rounds(federation)
            recent = history[-50:]
            # each round's deltas read once: the ledger needs every complete round, client DP the recent ones
            deltas = self._deltas(federation, history if cfg.dp_noise_multiplier else recent)
            client_dp = {}
            for info in recent:
                for client, rec in deltas[info.round].items():
                    if rec.dp:
                        client_dp[client] = {**rec.dp, "round": info.round}
            latest = self.state.latest_complete(federation)
            shown, warnings = self._recent_rounds(
                federation, [info for info in recent if info.round in (latest, current)], deltas
            )
            return Status(
                federation=federation,
                base_model=cfg.base_model,
                strategy=str(cfg.strategy),
                quorum=cfg.quorum,
                min_quorum=cfg.effective_min_quorum,
                round_timeout=cfg.round_timeout,
                current_round=current,
                state=RoundStatus(rnd.state),
                deltas=rnd.n,
                deadline=rnd.deadline or None,
                latest_complete=latest,
                task_type=None if cfg.task_type is None else str(cfg.task_type),
                labels=tuple(cfg.labels),
                clients_per_round=cfg.clients_per_round,
                prox_mu=cfg.prox_mu,
                scaffold=cfg.scaffold,
                personal_heads=cfg.personal_heads,
                server_opt=cfg.server_opt_settings(),
                mode=str(cfg.mode),
                buffered=cfg.buffered_settings(),
                selected=rnd.selected,
                privacy=(
                    _privacy_spent(
                        cfg, history, self._participants(federation, cfg, history) if cfg.secure_aggregation else deltas
                    )
                    if cfg.dp_noise_multiplier
                    else {}
                ),
                client_dp=client_dp,
                rejected=self._rejected(federation),
                recent_rounds=shown,
                warnings=warnings,
                trainable=rnd.trainable or None,
                secure=self._secure(federation, cfg, current),
            )

    def _secure(self, federation: str, cfg: FederationConfig, r: int) -> dict[str, Any]:
        if not cfg.secure_aggregation:
            return {}
        from .state.secagg import SecAggRounds

        rounds = SecAggRounds(self.redis, federation)
        out: dict[str, Any] = {
            "neighbours": cfg.secagg_neighbours,
            "threshold": cfg.secagg_threshold,
            "phase_timeout": cfg.secagg_phase_timeout,
        }
        state = rounds.state(r)
        if state is not None:
            out["round"] = {
                "phase": str(state.phase),
                "epoch": state.epoch,
                "deadline": state.deadline,
                "survivors": list(state.survivors),
                **(rounds.public_params(r) or {}),
            }
            out["round"].pop("layout", None)  # one line per tensor: the SDK's RoundPublic has it
        return out

    def _recent_rounds(
        self, federation: str, infos: list[RoundInfo], deltas: dict[int, dict[str, DeltaRecord]]
    ) -> tuple[tuple[RoundSummary, ...], tuple[str, ...]]:
        """The rounds ``status`` details (the latest complete one with its cosines), and what it could not read:
        the manifest lives in the store, and a store that cannot be read leaves the rest of status standing."""
        shown, warnings = [], []
        for info in infos:
            manifest = None
            if info.state == RoundStatus.COMPLETE and deltas[info.round]:
                try:
                    manifest = self._manifest(federation, info.round)
                except ChorusError as exc:
                    warnings.append(f"no cosines for round {info.round}: its manifest could not be read: {exc}")
            shown.append(RoundSummary.of(info, deltas[info.round], manifest))
        return tuple(shown), tuple(warnings)

    def _rejected(self, federation: str) -> dict[str, int]:
        """Inbox records dropped before authentication: the operator's figure; a client's Redis user may not
        read it (another client's junk is none of its business), so a client sees none."""
        try:
            return self.state.rejected(federation)
        except redis_lib.exceptions.NoPermissionError:
            return {}

    def privacy(self, federation: str) -> dict[str, dict[str, float]]:
        """Server-side DP spent by each authenticated client: every complete round it took part in is one
        Gaussian release at the federation's noise multiplier, composed by the accountant. Client sampling
        is public (recorded in each round), so it gives no amplification: only rounds a client was in count."""
        cfg = self.state.config(federation)
        history = self.state.rounds(federation)
        complete = [info for info in history if info.state == RoundStatus.COMPLETE]
        return _privacy_spent(cfg, history, self._participants(federation, cfg, complete))

    def _participants(
        self, federation: str, cfg: FederationConfig, rounds: list[RoundInfo]
    ) -> Mapping[int, Iterable[str]]:
        """Who is in each round's release: its deltas' clients, or a secure round's summed clients."""
        if not cfg.secure_aggregation:
            return self._deltas(federation, rounds)
        from .state.secagg import SecAggRounds

        secure = SecAggRounds(self.redis, federation)
        out: dict[int, tuple[str, ...]] = {}
        for info in rounds:
            state = secure.state(info.round)
            out[info.round] = state.survivors if state is not None else ()
        return out

    def _deltas(self, federation: str, rounds: list[RoundInfo]) -> dict[int, dict[str, DeltaRecord]]:
        return {info.round: self.state.deltas(federation, info.round) for info in rounds}

    def rounds(self, federation: str, *, cosines: int = 0) -> list[RoundSummary]:
        """Every round so far: state, deltas, clients, timings, manifest, what clients reported; the latest
        ``cosines`` complete rounds also with each client's cosine to the aggregate (one manifest read each)."""
        with _service(self.settings):
            history = self.state.rounds(federation)
            complete = [info.round for info in history if info.state == RoundStatus.COMPLETE]
            with_cosines = set(complete[-cosines:]) if cosines > 0 else set()
            return [
                RoundSummary.of(
                    info,
                    self.state.deltas(federation, info.round),
                    self._manifest(federation, info.round) if info.round in with_cosines else None,
                )
                for info in history
            ]

    def round(self, federation: str, round_: int, *, cosines: bool = False) -> RoundSummary:
        """One round; ``cosines``: a complete round also with each client's cosine (reads its manifest)."""
        info = self.state.round(federation, round_)
        manifest = self._manifest(federation, round_) if cosines and info.state == RoundStatus.COMPLETE else None
        return RoundSummary.of(info, self.state.deltas(federation, round_), manifest)

    def _manifest(self, federation: str, round_: int) -> Manifest:
        from .results import fetch_manifest

        return fetch_manifest(self.state, self.store, federation, round_)[0]

    def close_round(self, federation: str, round_: int | None = None) -> RoundSummary:
        """Close a round by hand: aggregate what it has (at least min-quorum deltas)."""
        r = round_ or self.state.current_round(federation)
        t = self.state.close(federation, r, "manual")
        if t.status == ScriptStatus.TOO_FEW:
            raise ConfigError(f"round {r} has {t.n} deltas; at least {t.detail} are needed to close it")
        if t.status == ScriptStatus.NOOP:
            raise RoundClosed(
                f"round {r} is not open (state {t.detail}); the current round is {self.state.current_round(federation)}"
            )
        if t.status == ScriptStatus.FIRED:
            self._dispatch(Task.ROUND, federation, r, t.epoch)
        return self.round(federation, r)

    def evict(self, federation: str, client: str, *, round_: int | None = None, reason: str = "") -> RoundSummary:
        """Remove a client's delta from an open round (operator)."""
        r = round_ or self.state.current_round(federation)
        t = self.state.evict(federation, r, client, reason or "evicted by the operator")
        if t.status != ScriptStatus.EVICTED:
            raise ConfigError(f"cannot evict {client!r} from round {r}: {t.status} {t.detail}".rstrip())
        return self.round(federation, r)

    def abort_round(self, federation: str, *, round_: int | None = None, reason: str = "") -> RoundSummary:
        """Abort an open or aggregating round (operator): nothing of it is aggregated; the next one opens."""
        r = round_ or self.state.current_round(federation)
        t = self.state.abort(federation, r, reason or "aborted by the operator")
        if t.status != ScriptStatus.ABORTED:
            raise ConfigError(f"cannot abort round {r}: {t.status} {t.detail}".rstrip())
        return self.round(federation, r)

    def compact(self, federation: str, round_: int | None = None) -> int:
        """Ask the workers to compact the cumulative correction up to ``round_`` (default: the latest)."""
        r = round_ if round_ is not None else self.state.latest_complete(federation)
        if not r:
            raise NotFound(f"federation {federation!r} has no complete round to compact")
        self._dispatch(Task.COMPACT, federation, r)
        return r

    # -- clients (operators) -----------------------------------------------------------------

    def clients(self, federation: str) -> ClientRegistry:
        self.state.meta(federation)
        return ClientRegistry(self.redis, federation)

    def add_client(
        self, federation: str, client: str, *, weight: float | None = None, dataset_size: float | None = None
    ) -> ClientCredentials:
        """Register a client; create its Redis user (append to its inbox, read its federation); return its
        credentials (shown once)."""
        from .state.acl import Acl, check_client_database, client_url

        registry = self.clients(federation)
        if self.settings.client_acl != "off":
            check_client_database(self.settings.public_redis_url or self.settings.redis_url)  # before registering
        secret = registry.add(client, weight=weight, dataset_size=dataset_size)
        username = url = None
        if self.settings.client_acl != "off":
            acl = Acl(self.redis)
            try:
                acl.grant(federation, client, secret)
                acl.save()
                username = acl.username(federation, client)
                url = client_url(self.settings.public_redis_url or self.settings.redis_url, federation, client, secret)
            except redis_lib.ResponseError as exc:
                if self.settings.client_acl == "on":
                    registry.revoke(client)
                    raise ConfigError(
                        f"cannot create the Redis user for {client!r}: {exc}; use operator "
                        "credentials (CHORUS_REDIS_URL) that may manage ACL users"
                    ) from None
        return ClientCredentials(federation, client, secret, username, url)

    def revoke_client(self, federation: str, client: str) -> RevokedDelta:
        """Revoke a client: its signatures stop verifying, its Redis user is removed, and its delta leaves the
        open current round (an aggregating round keeps it). Returns what happened to that delta."""
        from .state.acl import Acl

        self.clients(federation).revoke(client)
        if self.settings.client_acl != "off":
            try:
                acl = Acl(self.redis)
                acl.revoke(federation, client)
                acl.save()
            except redis_lib.ResponseError:
                if self.settings.client_acl == "on":
                    raise
        return self.state.evict_revoked(federation, client)

    def check_identity(self, federation: str, client_id: str) -> None:
        """Fail fast, before any local work, where these credentials cannot be ``client_id``'s in ``federation``.

        A client URL from ``client add`` names its own user: it must be this client's, and its password
        must be the signing secret (records signed with another secret get no verdict at all). The
        federation's meta is then read with them, so a refused password fails here too.
        """
        check_name(client_id, "client id")
        owner = _url_client(self.settings.redis_url)
        if owner is not None and owner != (federation, client_id):
            raise ConfigError(
                f"CHORUS_REDIS_URL holds the credentials of client {owner[1]!r} of federation {owner[0]!r}, "
                f"not of client {client_id!r} of federation {federation!r}: use the URL `client add` printed "
                "for this client"
            )
        password = _url_password(self.settings.redis_url)
        if owner is not None and password is not None and self.secret != password:
            raise ConfigError(
                f"the signing secret (--secret / CHORUS_CLIENT_SECRET) is not the password of client "
                f"{client_id!r}'s Redis URL: both come from `chorus-mq client add`, and records signed with "
                "another secret get no verdict"
            )
        with _service(self.settings):
            self.state.meta(federation)

    # -- upload --------------------------------------------------------------------------------

    def upload(
        self,
        federation: str,
        adapter: str | Path,
        client_id: str,
        *,
        dataset_size: float | None = None,
        round_: int | None = None,
        wait: bool = True,
        timeout: float = 300.0,
        lora_alpha: float | None = None,
        secret: str | None = None,
        dp: dict[str, Any] | None = None,
        label_counts: Mapping[str, int] | None = None,
        global_eval: GlobalEval | Mapping[str, Any] | None = None,
        progress: bool = False,
        lr_sum: float | None = None,
        base_version: int | None = None,
        secure_state_dir: str | Path | None = None,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> UploadResult:
        """Validate locally, store the delta under the client's prefix, append its signed record to the
        federation's inbox, and (by default) wait for the worker's verdict. ``lr_sum`` (SCAFFOLD
        federations): the learning rate summed over the local steps that trained the adapter.
        ``base_version`` (buffered federations, required there): the version the adapter was trained from;
        the delta goes into whatever buffer is open.

        ``label_counts`` (label -> examples of the training data) and ``global_eval`` (this client's evaluation
        of the global model it started from: round, loss, accuracy, examples) are optional reports that
        ``status`` and the round's manifest show; they are checked here as the workers will check them.

        On a ``--secure-aggregation`` federation the upload takes part in the round's secure aggregation
        (:meth:`secure_round`) and returns once the round published: status ``summed`` (this client's input is
        in the sum) or ``dropped``; ``secure_state_dir`` keeps its keys so a restarted upload resumes."""
        from .adapters import load_adapter, write_delta

        check_name(client_id, "client id")
        if dataset_size is not None and not (math.isfinite(dataset_size) and dataset_size > 0):
            raise ConfigError(f"dataset size must be a finite number above 0, got {dataset_size!r}")
        if lr_sum is not None and not (math.isfinite(lr_sum) and lr_sum > 0):
            raise ConfigError(f"lr_sum must be a finite number above 0, got {lr_sum!r}")
        with _service(self.settings):
            cfg = FederationConfig.from_hash(self.state.meta(federation))
        cfg.check_upload(round_, base_version)
        if cfg.secure_aggregation:
            local = load_adapter(adapter, lora_alpha=lora_alpha)
            secure = self.secure_round(
                federation,
                client_id,
                local.tensors,
                round_=round_,
                timeout=timeout,
                secret=secret,
                state_dir=secure_state_dir,
                on_phase=on_phase,
            )
            return UploadResult(
                federation,
                client_id,
                "",
                "",
                secure.masked_key,
                secure.round,
                "summed" if client_id in secure.summed else "dropped",
                len(secure.summed),
            )
        report = _report(
            federation,
            client_id,
            label_counts,
            global_eval,
            labels=cfg.labels,
            round_=round_,
            max_examples=self.settings.max_dataset_size,
        )
        local = load_adapter(adapter, lora_alpha=lora_alpha)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "delta.safetensors"
            sha = write_delta(local, path)
            key = delta_key(federation, client_id, sha)
            size = path.stat().st_size
            try:
                self.store.put_file(key, path, write_once=True, progress=byte_bar(progress, size, "upload"))
            except ObjectExists:
                pass  # content-addressed: the same bytes are already there
        msg = IngestMessage(
            federation=federation,
            round=round_,
            client_id=client_id,
            sha256=sha,
            size=size,
            dataset_size=dataset_size,
            dp=None if dp is None else ClientDP(**dp),
            lr_sum=lr_sum,
            label_counts=report.label_counts,
            global_eval=report.global_eval,
            base_version=base_version,
        )
        result = self.submit(msg, wait=wait, timeout=timeout, secret=secret)
        return dataclasses.replace(result, bytes=size)

    def secure_round(
        self,
        federation: str,
        client_id: str,
        tensors: Mapping[str, Any],
        *,
        round_: int | None = None,
        timeout: float = 600.0,
        poll: float = 0.1,
        secret: str | None = None,
        state_dir: str | Path | None = None,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> SecureResult:
        """Take part in a secure round (a ``--secure-aggregation`` federation) with ``tensors`` (the round's trained
        factor of every module, and the task head if any): every phase, then wait until the round publishes.
        ``state_dir`` keeps this client's keys between phases, so a restarted client resumes its round."""
        from .secure_upload import SecureUpload

        check_name(client_id, "client id")
        key = secret or self.secret
        if not key:
            raise ConfigError("secure aggregation needs a registered client's secret: its records are signed")
        r = round_ if round_ is not None else self.state.current_round(federation)
        session = SecureUpload(
            self,
            federation,
            client_id,
            r,
            secret=key,
            state_dir=None if state_dir is None else Path(state_dir),
            on_phase=on_phase,
        )
        return session.run(tensors, timeout=timeout, poll=poll)

    def submit(
        self, msg: IngestMessage, *, wait: bool = True, timeout: float = 300.0, secret: str | None = None
    ) -> UploadResult:
        """Append a record for an object already in the store, signed with the client's secret."""
        secret = secret or self.secret
        if secret:
            msg = msg.signed(secret)
        record = msg.model_dump_json()
        if len(record) > self.settings.max_inbox_record_bytes:
            counts = f" (its label_counts name {len(msg.label_counts)} labels)" if msg.label_counts else ""
            raise TooLarge(
                f"the upload record is {len(record)} bytes{counts}, over the {self.settings.max_inbox_record_bytes}"
                "-byte limit on inbox records (CHORUS_MAX_INBOX_RECORD_BYTES)"
            )
        log = self.state.events(msg.federation)
        with _service(self.settings):
            after = log.last_id()
            # a registered (signing) client appends to its own inbox; unsigned development uploads to the shared one
            owner = msg.client_id if msg.signature else None
            Inbox(self.redis, msg.federation, owner).append(record)
        if self.settings.eager:
            self._pump(msg.federation)
        result = UploadResult(
            msg.federation,
            msg.client_id,
            msg.upload_id,
            msg.sha256,
            delta_key(msg.federation, msg.client_id, msg.sha256),
            msg.round,
            "queued",
        )
        if not wait:
            return result
        started = checked = time.monotonic()
        for event in log.follow(after, deadline=started + timeout):
            if event is None or time.monotonic() - checked > 2:
                # a repeated rejection is counted in its round, not published: look there now and then
                checked = time.monotonic()
                repeated = self._repeated_rejection(msg)
                if repeated is not None:
                    raise Rejected(*repeated)
            if event is None:
                continue
            # the stream is the federation's: another client can reuse this upload_id on its own records
            if event.fields.get("upload_id") != msg.upload_id or event.fields.get("client") != msg.client_id:
                continue
            if event.type == EventType.DELTA_REJECTED:
                raise Rejected(str(event.fields.get("reason")), str(event.fields.get("code", "rejected")))
            if event.type == EventType.DELTA_ACCEPTED:
                status = "duplicate" if event.fields.get("duplicate") else "accepted"
                return dataclasses.replace(result, status=status, round=event.round, n=event.fields.get("n"))
        inbox = "its own inbox" if owner else "the federation's shared inbox"
        raise Timeout(
            f"no verdict yet for upload {msg.upload_id} after {time.monotonic() - started:.0f}s: its record is in "
            f"{inbox} of {msg.federation!r} (appended at {_redacted(self.settings.redis_url)}) and no worker has "
            "judged it. The ingest workers may be down or behind (`chorus-mq worker --role ingest`); the record "
            "stays in the inbox and is judged when they are back, so waiting again for the same upload is safe. "
            "Records whose signature does not verify, and records over the client's rate budget "
            "(CHORUS_INBOX_RATE_PER_S), are dropped without an answer (`status` counts those)"
        )

    def _repeated_rejection(self, msg: IngestMessage) -> tuple[str, str] | None:
        """(reason, code) when the workers rejected this upload as a repeat (counted in its round, not published)."""
        keys = FederationKeys(msg.federation)
        try:
            rounds = [msg.round] if msg.round else [self.state.current_round(msg.federation)]
            for r in rounds:
                raw = self.redis.hget(keys.rejections(r), f"last:{msg.client_id}")
                if raw is None:
                    continue
                last = json.loads(raw)
                if isinstance(last, dict) and last.get("upload_id") == msg.upload_id:
                    return str(last.get("reason", "")), str(last.get("code", "rejected"))
        except (redis_lib.RedisError, ChorusError, ValueError):
            return None  # unreadable now: keep waiting for the event
        return None

    # -- events --------------------------------------------------------------------------------

    def watch(
        self,
        federation: str,
        *,
        from_start: bool = False,
        after: str | None = None,
        until_round: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """Yield events as they happen, from now, from the start, or ``after`` a stream id seen before;
        with ``until_round`` stop after that round ends."""
        with _service(self.settings):
            self.state.meta(federation)
            log = self.state.events(federation)
            if after is None:
                replay = from_start or (until_round is not None and self._ended(federation, until_round))
                after = "0-0" if replay else log.last_id()
        deadline = None if timeout is None else time.monotonic() + timeout
        assert after is not None
        for event in log.follow(after, deadline=deadline):
            if event is None:
                continue
            yield event
            if until_round is not None and event.round == until_round and event.terminal:
                return
        if until_round is not None:
            raise Timeout(f"round {until_round} did not finish within {timeout:.0f}s")

    def wait_round(self, federation: str, round_: int, *, timeout: float | None = None) -> RoundSummary:
        """Block until round ``round_`` ended (complete, failed, expired or aborted); return it."""
        if not self._ended(federation, round_):
            for _event in self.watch(federation, until_round=round_, timeout=timeout):
                pass
        return self.round(federation, round_)

    def _ended(self, federation: str, r: int) -> bool:
        try:
            return self.state.round(federation, r).state in ENDED_STATES
        except NotFound:
            return False

    # -- pull ------------------------------------------------------------------------------------

    def pull(
        self,
        federation: str,
        output: str | Path,
        round_: int | None = None,
        *,
        since: int | None = None,
        exact_adapter: bool = False,
        residual_adapter: bool = False,
        fold: bool = False,
        progress: bool = False,
    ) -> Manifest:
        """Write round ``round_``'s global adapter (PEFT-loadable), its residual and the base correction into
        ``output``. A directory that holds an earlier round of this federation is brought up to date with the
        increments only (``since`` names that round explicitly); a new one starts from the latest snapshot.

        The correction is ``cumulative_residual.safetensors`` plus the files in ``increments/``
        (:func:`chorus_mq.pulled.iter_correction` sums them); ``fold=True`` folds it into the one file now.
        """
        from .pulled import pull

        with _service(self.settings):
            return pull(
                self,
                federation,
                Path(output),
                round_,
                since=since,
                exact_adapter=exact_adapter,
                residual_adapter=residual_adapter,
                fold=fold,
                progress=progress,
            )

    # -- training --------------------------------------------------------------------------------

    def train(self, **options: Any) -> Iterator[Any]:
        """Run the federation from this client's side: ``options`` are a ``chorus_mq.training.driver.TrainJob``'s
        fields."""
        from .training.driver import train_federation

        return train_federation(self, **options)

    def global_model(
        self,
        federation: str,
        model_dir: str | Path,
        round_: int | None = None,
        *,
        workdir: str | Path | None = None,
        trainable: bool = False,
    ) -> Any:
        """The exact global model of a round (base + cumulative correction in fp32 + global adapter)."""
        from .training.model import exact_model

        workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="chorus-model-"))
        self.pull(federation, workdir, round_)
        with _service(self.settings):
            task_type = self.state.config(federation).task_type
        if task_type is None:
            raise ConfigError(
                f"federation {federation!r} declares no task (seq-cls or causal-lm); it was created "
                "without --task or a task-typed adapter"
            )
        return exact_model(workdir, Path(model_dir), task=task_type, trainable=trainable)

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, task: Task, *args: Any) -> None:
        from .workers.app import get_dispatcher

        get_dispatcher(self.settings).send(task, *args)

    def _pump(self, federation: str) -> None:
        """Eager mode (``simulate``, tests): run the inbox pump and the tasks in this process."""
        from .workers import runtime
        from .workers.app import get_dispatcher
        from .workers.pump import InboxPump

        rt = runtime.current() if runtime.installed() else runtime.Runtime(self.settings, self.redis, self.store)
        InboxPump(rt, get_dispatcher(self.settings), consumer="sdk").drain(federation)


def _privacy_spent(
    cfg: FederationConfig, history: list[RoundInfo], deltas: Mapping[int, Iterable[str]]
) -> dict[str, dict[str, float]]:
    """Per client, the accountant's epsilon over the complete rounds of ``history`` it has a delta in."""
    from .aggregation.dp import PrivacyAccountant

    rounds: dict[str, int] = {}
    for info in history:
        if info.state == RoundStatus.COMPLETE:
            for client in deltas[info.round]:
                rounds[client] = rounds.get(client, 0) + 1
    out = {}
    for client, k in rounds.items():
        acc = PrivacyAccountant()
        acc.spend(cfg.dp_noise_multiplier, rounds=k)
        out[client] = {"epsilon": acc.epsilon(cfg.dp_delta), "delta": cfg.dp_delta, "rounds": float(k)}
    return out


class _service:
    """Turn an unreachable Redis into one clear ``ServiceUnavailable`` (retrying is safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, redis_lib.exceptions.AuthenticationError):
            raise AuthError(
                f"Redis refused these credentials ({_redacted(self.settings.redis_url)}): check "
                "CHORUS_REDIS_URL (a client's URL comes from `chorus-mq client add`)"
            ) from None
        if isinstance(exc, redis_lib.exceptions.NoPermissionError):
            owner = _url_client(self.settings.redis_url)
            whose = f" (they belong to client {owner[1]!r} of federation {owner[0]!r})" if owner else ""
            raise AuthError(
                f"Redis denied this operation to {_redacted(self.settings.redis_url)}'s user{whose}: {exc}"
            ) from None
        if isinstance(exc, (redis_lib.ConnectionError, redis_lib.TimeoutError)):
            raise ServiceUnavailable(
                f"Redis at {_redacted(self.settings.redis_url)} is unreachable ({exc}); "
                "retrying the same command is safe"
            ) from None


def _report(
    federation: str,
    client_id: str,
    label_counts: Mapping[str, int] | None,
    global_eval: GlobalEval | Mapping[str, Any] | None,
    *,
    labels: tuple[str, ...],
    round_: int | None,
    max_examples: float,
) -> IngestMessage:
    """A client's optional reports, parsed and checked as the workers will (a clear error now, not a lost
    record); returned on a message that carries nothing else."""
    body: dict[str, Any] = {"federation": federation, "client_id": client_id, "sha256": "0" * 64, "size": 0}
    if label_counts is not None:
        body["label_counts"] = dict(label_counts)
    if global_eval is not None:
        body["global_eval"] = global_eval.model_dump() if isinstance(global_eval, GlobalEval) else dict(global_eval)
    try:
        msg = IngestMessage.parse(body)
    except InvalidAdapter as exc:
        raise InvalidReport(str(exc).replace("malformed ingest message", "upload report")) from None
    msg.check_report(labels, round_, max_examples)
    return msg


def _span(start: float | None, end: float | None) -> float | None:
    return end - start if start and end else None


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else f"***@{netloc}"))


def _url_client(url: str) -> tuple[str, str] | None:
    """``(federation, client)`` whose Redis user the URL names; None for any other user or none."""
    from urllib.parse import unquote, urlsplit

    user = urlsplit(url).username
    return parse_client_username(unquote(user)) if user else None


def _url_password(url: str) -> str | None:
    """A client's URL carries its secret as the Redis password; it also signs the client's records."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username and parts.password and ":" in unquote(parts.username):
        return unquote(parts.password)
    return None


__all__ = ["ChorusClient", "ClientCredentials", "RoundFailed", "RoundSummary", "Status", "UploadResult"]
