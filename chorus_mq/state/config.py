"""A federation's configuration: typed, validated, stored as the ``meta`` hash."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError
from ..ids import check_name
from ..names import (
    ExpirePolicy,
    FederationMode,
    MissingModules,
    RobustAggregate,
    ServerOptimizer,
    SnapshotDtype,
    Strategy,
    TaskType,
    WeightPolicy,
)
from ..staleness import StalenessRule
from ..strategy import all_specs, check_buffered, strategy_spec
from .protocol import decode_fields, encode_value, field_types


@dataclass(frozen=True)
class FederationConfig:
    """Everything the operator fixes at ``federation create``. Enum fields also accept their string values."""

    name: str
    base_model: str
    quorum: int
    strategy: Strategy = Strategy.FEDEX_LORA
    min_quorum: int = 0  # 0: the deadline closes a round only once the full quorum is there
    round_timeout: int = 0  # seconds; 0 = no deadline
    expire_policy: ExpirePolicy = ExpirePolicy.EXTEND
    out_rank: int = 0  # svd output rank; 0 = largest client rank
    # robust aggregation (off by default: every accepted delta counts, exactly)
    clip_norm: float = 0.0  # bound on each client's adapter-wide update norm ||s B A||_F; 0 = none
    screen_outliers: bool = False  # exclude median/MAD outliers (norms, distance to the geometric median)
    outlier_z: float = 3.5
    robust_aggregate: RobustAggregate = RobustAggregate.MEAN
    trim: int = 0
    # server-side client-level differential privacy (Gaussian mechanism on the aggregate update)
    dp_noise_multiplier: float = 0.0  # noise std / sensitivity; 0 = off
    dp_delta: float = 1e-5
    # whose word sets the weights, and how far any one client's weight may go
    weights: WeightPolicy = WeightPolicy.DATASET_SIZE
    max_client_weight: float = 0.5
    missing_modules: MissingModules = MissingModules.ZERO
    #: ingest refuses a module update whose ||s B A||_F is above this
    max_update_norm: float = 1e4
    #: clip each client's update (per module and adapter-wide) to this many times the round's
    #: lower-median client norm; 0 = off. Off under DP. See docs/DESIGN.md section 1
    relative_clip: float = 10.0
    #: clients drawn per round (buffered: per buffer, drawn when it opens); 0 = every registered client may take part
    clients_per_round: int = 0
    #: compact the cumulative correction every this many rounds; 0 = only on demand
    checkpoint_every: int = 10
    snapshot_dtype: SnapshotDtype = SnapshotDtype.FLOAT32
    task_type: TaskType | None = None
    labels: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    #: FedProx weight every client's local training uses unless it overrides it (``train --prox-mu``)
    prox_mu: float = 0.0
    #: SCAFFOLD control variates on the trained LoRA tensors: every client corrects its local steps by the
    #: server variate published with each round (docs/DESIGN.md section 1)
    scaffold: bool = False
    #: seq-cls: each client keeps its own task head (never uploaded); the LoRA body is aggregated as usual
    #: and every round publishes round 0's head as the global one (docs/DESIGN.md section 1)
    personal_heads: bool = False
    #: the server optimiser stepping each round's exact pseudo-gradient (docs/DESIGN.md section 1)
    server_opt: ServerOptimizer = ServerOptimizer.NONE
    #: None: the optimiser's own default (``ServerOptimizer.default_lr``), fixed at creation
    server_lr: float | None = None
    server_momentum: float = 0.9  # fedavgm
    server_beta1: float = 0.9  # fedadam, fedyogi
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    #: buffered (FedBuff) mode: the quorum is the buffer size K, min-quorum the --min-buffer a flush
    #: timeout (round-timeout) needs; a version is a round number (docs/DESIGN.md section 1)
    mode: FederationMode = FederationMode.SYNC
    #: buffered: ingest refuses a delta trained from a version more than this many versions old
    max_staleness: int = 10
    #: buffered: g(τ), ``constant``, ``poly:A`` or ``hinge:A,B``
    staleness_weight: str = "poly:0.5"
    #: buffered: accepted deltas of one client in one flush; its policy weight is split evenly among them
    max_per_client_per_flush: int = 1
    #: secure aggregation (SecAgg+, chorus_mq/secagg): workers see only the sum of the clients' masked updates
    secure_aggregation: bool = False
    #: K, each client's neighbours in the masking graph; 0: min(N - 1, 4 ceil(log2 N)) for the round's cohort
    secagg_neighbours: int = 0
    #: T, shares that recover a client's masks; 0: floor(K/2) + 1
    secagg_threshold: int = 0
    #: seconds each secure-aggregation phase stays open before its deadline closes it with whoever sent
    secagg_phase_timeout: int = 300

    def __post_init__(self) -> None:
        _coerce_enums(self)
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", self.server_opt.default_lr)
        check_name(self.name, "federation name")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_flag(f.name)} must be a finite number, got {value!r}")
        if self.quorum < 1:
            raise ConfigError("quorum must be at least 1")
        if self.min_quorum < 0 or self.min_quorum > self.quorum:
            raise ConfigError("min-quorum must be between 1 and the quorum (0: the quorum itself)")
        if self.round_timeout < 0 or self.out_rank < 0:
            raise ConfigError("round timeout and output rank cannot be negative")
        if self.clip_norm < 0 or self.outlier_z <= 0 or self.trim < 0 or self.dp_noise_multiplier < 0:
            raise ConfigError("clip norm, trim and noise multiplier cannot be negative; outlier z must be > 0")
        if self.trim and self.robust_aggregate != RobustAggregate.TRIMMED:
            raise ConfigError("--trim applies only to --robust-aggregate trimmed")
        if self.dp_noise_multiplier:
            if not self.clip_norm:
                raise ConfigError("differential privacy needs --clip-norm: the noise is calibrated to it")
            if self.screen_outliers or self.robust_aggregate != RobustAggregate.MEAN:
                raise ConfigError(
                    "differential privacy needs data-independent weights: turn off outlier screening and use the mean"
                )
            if not 0 < self.dp_delta < 1:
                raise ConfigError("--dp-delta must be between 0 and 1")
        if not 0 < self.max_client_weight <= 1:
            raise ConfigError("--max-client-weight must be in (0, 1]: it is a share of the round")
        if self.max_update_norm <= 0:
            raise ConfigError("--max-update-norm must be a finite number above 0")
        if self.relative_clip and self.relative_clip < 1:
            raise ConfigError("--relative-clip must be 0 (off) or at least 1: it is a multiple of the median norm")
        if self.clients_per_round < 0:
            raise ConfigError("--clients-per-round cannot be negative (0: every client, every round)")
        # a buffered client may send up to --max-per-client-per-flush deltas to one buffer
        per_client = self.max_per_client_per_flush if self.mode == FederationMode.BUFFERED else 1
        if self.clients_per_round and self.quorum > self.clients_per_round * per_client:
            raise ConfigError(
                f"quorum {self.quorum} can never be reached with {self.clients_per_round} clients per round"
                + (f" sending up to {per_client} deltas each" if per_client > 1 else "")
                + ": lower the quorum or raise --clients-per-round"
            )
        if self.prox_mu < 0:
            raise ConfigError("--prox-mu cannot be negative (0: off)")
        self._check_strategy()
        if self.scaffold:
            if not strategy_spec(self.strategy).scaffold:
                raise ConfigError(
                    "--scaffold needs a global adapter at the clients' own rank; stack's rank is the sum of "
                    "the uploads': use fedex-lora, fedavg or svd"
                )
            if self.dp_noise_multiplier:
                raise ConfigError(
                    "--scaffold publishes a variate computed from the clients' un-noised updates, which would "
                    "bypass server-side differential privacy: use one or the other"
                )
        if self.scaffold and self.personal_heads:
            raise ConfigError(
                "--scaffold and --personal-heads do not combine yet: the server variate covers the head, which "
                "personal heads keep off the server; use one or the other"
            )
        if self.personal_heads and self.task_type != TaskType.SEQ_CLS:
            raise ConfigError(
                "--personal-heads keeps each client's task head local: it needs a seq-cls federation "
                "(--task seq-cls --labels ...)"
            )
        self._check_server_opt()
        self._check_buffered()
        self._check_secure()
        if self.checkpoint_every < 0:
            raise ConfigError("--checkpoint-every cannot be negative (0: compact only on demand)")
        if not isinstance(self.labels, tuple) or not all(isinstance(x, str) and x for x in self.labels):
            raise ConfigError("labels must be a tuple of non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be distinct, got {list(self.labels)}")

    def _check_server_opt(self) -> None:
        # the same bounds as aggregation.server_opt.ServerOptConfig, said with the CLI's flags (no torch here)
        if self.server_step_size <= 0 or self.server_tau <= 0:
            raise ConfigError("--server-lr and --server-tau must be above 0")
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        used = _SERVER_OPT_SETTINGS[self.server_opt]
        if self.mode == FederationMode.BUFFERED:
            used = (*used, "lr")  # a flush's η
        defaults = {f.name: f.default for f in dataclasses.fields(self)} | {"server_lr": self.server_opt.default_lr}
        for name in ("lr", "momentum", "beta1", "beta2", "tau"):
            field_name = f"server_{name}"
            if name not in used and getattr(self, field_name) != defaults[field_name]:
                raise ConfigError(f"{_flag(field_name)} does not apply to --server-opt {self.server_opt}")
        if self.server_opt == ServerOptimizer.NONE:
            return
        if self.mode == FederationMode.BUFFERED:
            raise ConfigError(
                f"--server-opt {self.server_opt} is not built for --mode buffered: a flush steps by "
                "--server-lr alone (use --server-opt none)"
            )
        if not strategy_spec(self.strategy).server_opt:
            raise ConfigError(
                f"--server-opt {self.server_opt} cannot step --strategy stack: its clients start from a "
                "rank-truncated approximation of the global, not from it; use fedex-lora, svd or fedavg"
            )

    @property
    def server_step_size(self) -> float:
        """The server optimiser's step size (``server_lr``, resolved to the optimiser's default at creation)."""
        return self.server_opt.default_lr if self.server_lr is None else self.server_lr

    def _check_buffered(self) -> None:
        """The buffered settings, and refusals of what buffered mode does not combine with (yet)."""
        StalenessRule.parse(self.staleness_weight)  # ConfigError naming the forms
        if self.max_staleness < 0:
            raise ConfigError("--max-staleness cannot be negative (0: only deltas of the latest version)")
        if self.max_per_client_per_flush < 1:
            raise ConfigError("--max-per-client-per-flush must be at least 1")
        if self.mode != FederationMode.BUFFERED:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in ("max_staleness", "staleness_weight", "max_per_client_per_flush"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{_flag(name)} applies only to --mode buffered")
            return
        check_buffered(self.strategy)
        refused = {
            "--scaffold": self.scaffold,
            "--personal-heads": self.personal_heads,
            # --clip-norm and --relative-clip bound each delta's update against its own base version (workers/flush.py)
            "--screen-outliers / --robust-aggregate": self.screen_outliers
            or self.robust_aggregate != RobustAggregate.MEAN,
            "--expire-policy expire": self.expire_policy == ExpirePolicy.EXPIRE,
            # a linear strategy's norm bounds clip its trained factor's step against its base's (workers/flush.py)
        }
        for what, on in refused.items():
            if on:
                raise ConfigError(f"--mode buffered does not combine with {what} yet")

    @property
    def buffered(self) -> bool:
        return self.mode == FederationMode.BUFFERED

    def buffered_settings(self) -> dict[str, Any]:
        """The flush settings of a buffered federation ({} for synchronous rounds)."""
        if not self.buffered:
            return {}
        return {
            "buffer": self.quorum,
            "min_buffer": self.effective_min_quorum,
            "flush_timeout": self.round_timeout,
            "max_staleness": self.max_staleness,
            "staleness_weight": self.staleness_weight,
            "server_lr": self.server_step_size,
            "max_per_client_per_flush": self.max_per_client_per_flush,
        }

    def check_upload(self, round_: int | None, base_version: int | None) -> None:
        """ConfigError for an upload's round / base version that does not fit the mode: a buffered upload names
        the version it trained from and no round (it joins the open buffer); a sync upload names no version."""
        if not self.buffered:
            if base_version is not None:
                raise ConfigError(
                    f"federation {self.name!r} has synchronous rounds: --base-version is for buffered ones"
                )
            return
        if round_ is not None:
            raise ConfigError(
                f"federation {self.name!r} is buffered: an upload joins the open buffer, so it names the version it "
                "trained from (--base-version V), not a round"
            )
        if base_version is None:
            raise ConfigError(
                f"federation {self.name!r} is buffered: name the version the adapter was trained from "
                "(--base-version V, the round you pulled; `chorus-mq train` fills it)"
            )

    def _check_strategy(self) -> None:
        """Refuse what a strategy does not combine with (each said with its flag; see chorus_mq/strategy.py)."""
        spec = strategy_spec(self.strategy)
        if not spec.frozen_shared:
            return  # the existing strategies' own messages follow (scaffold, server-opt)
        why = f"--strategy {self.strategy} freezes a shared factor that every client must upload unchanged"
        refused = {
            "--scaffold": self.scaffold and not spec.scaffold,
            "--server-opt": self.server_opt != ServerOptimizer.NONE and not spec.server_opt,
            "--personal-heads": self.personal_heads and not spec.personal_heads,
            "--robust-aggregate": self.robust_aggregate != RobustAggregate.MEAN and not spec.robust,
            "--out-rank": bool(self.out_rank) and not spec.out_rank_option,
        }
        for flag, bad in refused.items():
            if bad:
                raise ConfigError(f"{why}; it does not support {flag} yet: leave it out or use another strategy")

    def _check_secure(self) -> None:
        """The secure-aggregation settings, and refusals of what needs a client's update in the clear."""
        if self.secagg_neighbours < 0 or self.secagg_threshold < 0 or self.secagg_phase_timeout < 1:
            raise ConfigError(
                "--secagg-neighbours and --secagg-threshold cannot be negative (0: the default) and "
                "--secagg-phase-timeout must be at least 1 second"
            )
        if (
            self.secagg_neighbours
            and self.secagg_threshold
            and not (self.secagg_neighbours / 2 < self.secagg_threshold <= self.secagg_neighbours)
        ):
            raise ConfigError(
                f"--secagg-threshold must be above K/2 and at most --secagg-neighbours K = {self.secagg_neighbours}, "
                f"got {self.secagg_threshold}"
            )
        if not self.secure_aggregation:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in ("secagg_neighbours", "secagg_threshold", "secagg_phase_timeout"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{_flag(name)} applies only with --secure-aggregation")
            return
        if not strategy_spec(self.strategy).linear:
            linear = ", ".join(s.name.value for s in all_specs() if s.linear)
            raise ConfigError(
                f"--secure-aggregation needs a linear strategy ({linear}): {self.strategy} needs each "
                "client's factors in the clear, which secure aggregation hides from the workers"
            )
        why = "--secure-aggregation hides each client's update from the workers, so it does not combine with"
        refused = {
            "--mode buffered (not built yet)": self.buffered,
            "--screen-outliers / --robust-aggregate (they need each update in the clear)": (
                self.screen_outliers or self.robust_aggregate != RobustAggregate.MEAN
            ),
            "--relative-clip (it needs each update's norm; pass --relative-clip 0)": bool(self.relative_clip),
            "--scaffold (its variate needs each update)": self.scaffold,
            "--personal-heads (not built yet)": self.personal_heads,
        }
        for what, on in refused.items():
            if on:
                raise ConfigError(f"{why} {what}")

    def server_opt_settings(self) -> dict[str, Any]:
        """``{"optimizer": ..., "lr": ..., ...}``: the server optimiser and the settings it uses; {} for none."""
        if self.server_opt == ServerOptimizer.NONE:
            return {}
        return {"optimizer": str(self.server_opt)} | {
            name: getattr(self, f"server_{name}") for name in _SERVER_OPT_SETTINGS[self.server_opt]
        }

    @property
    def screening(self) -> bool:
        return bool(self.clip_norm or self.screen_outliers or self.robust_aggregate != RobustAggregate.MEAN)

    @property
    def effective_min_quorum(self) -> int:
        return self.min_quorum or self.quorum

    def to_hash(self) -> dict[str, str]:
        """Every field as a string (booleans ``"1"``/``"0"``); :meth:`from_hash` reads it back equal."""
        return {f.name: encode_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> FederationConfig:
        """Read a ``meta`` hash; fields it lacks (an older federation) take their defaults, others are ignored."""
        return cls(**decode_fields(cls, h, where="federation config"))


#: the ``server_*`` settings each server optimiser uses
_SERVER_OPT_SETTINGS: dict[ServerOptimizer, tuple[str, ...]] = {
    ServerOptimizer.NONE: (),
    ServerOptimizer.FEDAVGM: ("lr", "momentum"),
    ServerOptimizer.FEDADAM: ("lr", "beta1", "beta2", "tau"),
    ServerOptimizer.FEDYOGI: ("lr", "beta1", "beta2", "tau"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce_enums(cfg: FederationConfig) -> None:
    """Turn string values of enum fields into their members; an unknown one is a ConfigError naming the choices."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        enum_type = _enum_of(hints[f.name])
        value = getattr(cfg, f.name)
        if enum_type is None or value is None or isinstance(value, enum_type):
            continue
        try:
            object.__setattr__(cfg, f.name, enum_type(value))
        except ValueError:
            choices = ", ".join(str(m.value) for m in enum_type)
            raise ConfigError(f"unknown {_flag(f.name)} {value!r}; choose one of {choices}") from None
    if isinstance(cfg.labels, list):
        object.__setattr__(cfg, "labels", tuple(cfg.labels))


def _enum_of(tp: Any) -> type[Enum] | None:
    candidates = typing.get_args(tp) if typing.get_origin(tp) is not None else (tp,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return candidate
    return None
