"""The round state machine over Redis. Each transition is one Lua script; Redis decides, not Celery."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from redis import Redis

from ..errors import ConfigError, FederationExists, UnknownFederation, UnknownRound
from ..ids import check_name
from .events import prelude_args
from .keys import FEDERATIONS, FederationKeys
from .scripts import Scripts

STRATEGIES = ("fedex-lora", "fedavg", "svd", "stack")
ROBUST_AGGREGATES = ("mean", "trimmed", "geomedian")
EXPIRE_POLICIES = ("extend", "expire")


@dataclass(frozen=True)
class FederationConfig:
    name: str
    base_model: str
    quorum: int
    strategy: str = "fedex-lora"
    min_quorum: int = 0  # 0: the deadline closes a round only once the full quorum is there
    round_timeout: int = 0  # seconds; 0 = no deadline
    expire_policy: str = "extend"
    out_rank: int = 0  # svd output rank; 0 = largest client rank
    # robust aggregation (off by default: every accepted delta counts, exactly)
    clip_norm: float = 0.0  # bound on each client's adapter-wide update norm ||s B A||_F; 0 = none
    screen_outliers: int = 0  # 1: exclude median/MAD outliers (norms, distance to the geometric median)
    outlier_z: float = 3.5
    robust_aggregate: str = "mean"  # mean | trimmed | geomedian
    trim: int = 0
    # server-side client-level differential privacy (Gaussian mechanism on the aggregate update)
    dp_noise_multiplier: float = 0.0  # noise std / sensitivity; 0 = off
    dp_delta: float = 1e-5

    def __post_init__(self):
        check_name(self.name, "federation name")
        if self.quorum < 1:
            raise ConfigError("quorum must be at least 1")
        if self.min_quorum < 0 or self.min_quorum > self.quorum:
            raise ConfigError("min-quorum must be between 1 and the quorum")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.expire_policy not in EXPIRE_POLICIES:
            raise ConfigError(f"expire policy must be one of {', '.join(EXPIRE_POLICIES)}")
        if self.round_timeout < 0 or self.out_rank < 0:
            raise ConfigError("round timeout and output rank cannot be negative")
        if self.robust_aggregate not in ROBUST_AGGREGATES:
            raise ConfigError(f"robust aggregate must be one of {', '.join(ROBUST_AGGREGATES)}")
        if self.clip_norm < 0 or self.outlier_z <= 0 or self.trim < 0 or self.dp_noise_multiplier < 0:
            raise ConfigError("clip norm, trim and noise multiplier cannot be negative; outlier z must be > 0")
        if self.trim and self.robust_aggregate != "trimmed":
            raise ConfigError("--trim applies only to --robust-aggregate trimmed")
        if self.dp_noise_multiplier:
            if not self.clip_norm:
                raise ConfigError("differential privacy needs --clip-norm: the noise is calibrated to it")
            if self.screen_outliers or self.robust_aggregate != "mean":
                raise ConfigError("differential privacy needs data-independent weights: "
                                  "turn off outlier screening and use the mean")
            if not 0 < self.dp_delta < 1:
                raise ConfigError("--dp-delta must be between 0 and 1")

    @property
    def screening(self) -> bool:
        return bool(self.clip_norm or self.screen_outliers or self.robust_aggregate != "mean")

    @property
    def effective_min_quorum(self) -> int:
        return self.min_quorum or self.quorum

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "FederationConfig":
        kw: dict[str, Any] = {}
        casts = {"int": int, "float": float, "str": str}
        for f in fields(cls):
            if f.name in h:
                kw[f.name] = casts[f.type](h[f.name])
        return cls(**kw)


@dataclass(frozen=True)
class Registration:
    status: str  # accepted | fired | duplicate | conflict | closed | no_round | shape_mismatch
    n: int
    epoch: int
    detail: str


@dataclass(frozen=True)
class Transition:
    status: str
    n: int = 0
    epoch: int = 0
    detail: str = ""


class RoundState:
    """Reads and transitions the rounds of every federation on one Redis."""

    def __init__(self, redis: Redis, *, maxlen: int = 100_000, lease_s: int = 1900):
        self.redis = redis
        self.maxlen = maxlen
        self.lease_s = lease_s
        self.scripts = Scripts(redis)

    def _args(self, federation: str, round_: int, now: float | None) -> list:
        return prelude_args(federation, round_, self.maxlen, now)

    def _round_keys(self, k: FederationKeys, r: int) -> list[str]:
        return [k.meta, k.round(r), k.round(r + 1), k.events, k.deadlines, k.leases]

    # -- federations -----------------------------------------------------------------

    def create_federation(self, cfg: FederationConfig, now: float | None = None) -> None:
        k = FederationKeys(cfg.name)
        pairs: list[Any] = []
        for key, value in asdict(cfg).items():
            pairs += [key, value]
        self.redis.sadd(FEDERATIONS, cfg.name)
        created = self.scripts.create_federation(
            keys=[k.meta, k.round(1), k.events, k.deadlines], args=[*self._args(cfg.name, 1, now), *pairs]
        )
        if not created:
            raise FederationExists(f"federation {cfg.name!r} already exists")
        # the DP noise seed derives from this secret, so a re-run releases identical noise
        self.redis.hsetnx(k.secrets, "noise_key", secrets.token_hex(32))

    def noise_key(self, federation: str) -> str:
        key = self.redis.hget(FederationKeys(federation).secrets, "noise_key")
        if not key:
            raise ConfigError(f"federation {federation!r} has no noise key; it was created incompletely")
        return key

    def federations(self) -> list[str]:
        return sorted(self.redis.smembers(FEDERATIONS))

    def meta(self, federation: str) -> dict[str, str]:
        check_name(federation, "federation name")
        h = self.redis.hgetall(FederationKeys(federation).meta)
        if not h:
            raise UnknownFederation(
                f"no federation named {federation!r}; create it with `chorus-mq federation create`"
            )
        return h

    def config(self, federation: str) -> FederationConfig:
        return FederationConfig.from_hash(self.meta(federation))

    def current_round(self, federation: str) -> int:
        return int(self.meta(federation)["current_round"])

    # -- rounds ----------------------------------------------------------------------

    def round(self, federation: str, r: int) -> dict[str, Any]:
        h = self.redis.hgetall(FederationKeys(federation).round(r))
        if not h:
            self.meta(federation)
            raise UnknownRound(f"federation {federation!r} has no round {r}")
        out: dict[str, Any] = {"round": r}
        for key, value in h.items():
            if key.startswith("sha:"):
                continue
            out[key] = _number(value) if key in _NUMERIC else value
        return out

    def rounds(self, federation: str) -> list[dict[str, Any]]:
        current = self.current_round(federation)
        return [self.round(federation, r) for r in range(1, current + 1)]

    def registered_sha(self, federation: str, r: int, client: str) -> str | None:
        return self.redis.hget(FederationKeys(federation).round(r), f"sha:{client}")

    def deltas(self, federation: str, r: int) -> dict[str, dict]:
        raw = self.redis.hgetall(FederationKeys(federation).deltas(r))
        return {client: json.loads(rec) for client, rec in sorted(raw.items())}

    # -- transitions -----------------------------------------------------------------

    def register(self, federation: str, r: int, *, client: str, sha256: str, record: dict,
                 upload_id: str, shapes: dict[str, tuple[int, int]], now: float | None = None) -> Registration:
        k = FederationKeys(federation)
        now = time.time() if now is None else now
        shape_args: list[Any] = []
        for module in sorted(shapes):
            d_out, d_in = shapes[module]
            shape_args += [module, f"{d_out},{d_in}"]
        res = self.scripts.register_delta(
            keys=[k.meta, k.round(r), k.deltas(r), k.events, k.deadlines, k.leases, k.shapes],
            args=[*self._args(federation, r, now), client, sha256, json.dumps(record, sort_keys=True),
                  upload_id, repr(now + self.lease_s), *shape_args],
        )
        return Registration(res[0], int(res[1]), int(res[2]), res[3])

    def close(self, federation: str, r: int, mode: str = "manual", now: float | None = None) -> Transition:
        k = FederationKeys(federation)
        now = time.time() if now is None else now
        res = self.scripts.close_round(
            keys=self._round_keys(k, r), args=[*self._args(federation, r, now), mode, repr(now + self.lease_s)]
        )
        return Transition(res[0], int(res[1]), int(res[2]), res[3])

    def finalize(self, federation: str, r: int, epoch: int, manifest_key: str, summary: dict,
                 now: float | None = None) -> Transition:
        k = FederationKeys(federation)
        res = self.scripts.finalize(
            keys=self._round_keys(k, r),
            args=[*self._args(federation, r, now), epoch, manifest_key, json.dumps(summary)],
        )
        return Transition(res[0], detail=str(res[1]))

    def fail(self, federation: str, r: int, epoch: int, reason: str, now: float | None = None) -> Transition:
        k = FederationKeys(federation)
        res = self.scripts.fail_round(keys=self._round_keys(k, r), args=[*self._args(federation, r, now), epoch, reason])
        return Transition(res[0], detail=str(res[1]))

    def reclaim(self, federation: str, r: int, now: float | None = None) -> Transition:
        k = FederationKeys(federation)
        now = time.time() if now is None else now
        res = self.scripts.reclaim(
            keys=[k.round(r), k.leases, k.events], args=[*self._args(federation, r, now), repr(now + self.lease_s)]
        )
        return Transition(res[0], epoch=int(res[1]))

    def due(self, federation: str, now: float | None = None) -> tuple[list[int], list[int]]:
        """Rounds whose deadline passed, and aggregations whose lease ran out."""
        now = time.time() if now is None else now
        k = FederationKeys(federation)
        deadlines = self.redis.zrangebyscore(k.deadlines, "-inf", now)
        leases = self.redis.zrangebyscore(k.leases, "-inf", now)
        return [int(r) for r in deadlines], [int(r) for r in leases]


_NUMERIC = {"epoch", "n", "quorum", "min_quorum", "opened_at", "deadline", "agg_started", "lease_until",
            "completed_at", "extensions", "reclaims", "failed_at", "closed_at"}


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
