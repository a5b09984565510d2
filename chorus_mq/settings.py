"""All configuration, from the environment (prefix ``CHORUS_``) or keyword overrides."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker; defaults to ``redis_url``
    broker_url: str | None = None
    #: ``s3://bucket/prefix`` or ``file:///path``
    store: str = "file://./chorus-data"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    #: seconds to open a connection to the object store, and to wait for each read of an answer
    s3_connect_timeout: float = Field(default=2.0, gt=0)
    s3_read_timeout: float = Field(default=30.0, gt=0)
    #: attempts per S3 request on transient errors (5xx, throttling, timeouts, dropped connections), with
    #: jittered backoff of at most 4 s between them; an endpoint that cannot be connected to gets at most 3
    s3_max_attempts: int = Field(default=5, ge=1)

    #: largest delta object accepted, checked before download
    max_delta_bytes: int = 2 * 1024**3
    #: largest safetensors header accepted (a further bound relative to the tensor count applies)
    max_header_bytes: int = 4 * 1024**2
    #: where workers spool downloaded deltas
    spool_dir: str | None = None

    #: Celery timing; must satisfy soft < hard < visibility timeout
    task_soft_time_limit: int = 1500
    task_time_limit: int = 1800
    visibility_timeout: int = 3600
    #: an aggregation lease: every running task of a round renews it every third of this;
    #: when it runs out (the worker died) the sweep re-dispatches the round under a new epoch
    aggregation_lease: int = Field(default=30, ge=3)
    #: modules aggregated side by side, one torch thread each (default: the cores available)
    aggregation_workers: int | None = Field(default=None, ge=1)
    #: each client's cosine to the round's aggregate, in the manifest (float64 Grams of the round's factors:
    #: O(K² (d_out + d_in)) per module for K summed ranks; off saves that on the round's critical path)
    round_cosines: bool = True
    #: a round's modules are split into shards of about this many input bytes each ...
    shard_bytes: int = Field(default=128 * 1024**2, ge=1)
    #: ... and at most this many shards (each is its own task, any worker takes it)
    max_shards: int = Field(default=16, ge=1)
    #: beat period for the sweep (deadlines, expired leases, compactions due)
    sweep_interval: float = Field(default=5.0, gt=0)
    task_max_retries: int = 5
    #: an aggregation reclaimed this many times (its workers keep dying) fails its round
    max_aggregation_attempts: int = 3

    #: events stream is trimmed to about this many entries per federation
    events_maxlen: int = 100_000

    #: the uploading client's secret (signs its records); also the password of its Redis user
    client_secret: str | None = None

    #: accept unsigned messages from unregistered clients: local development only.
    #: Registered clients must sign whatever this says.
    allow_unsigned: bool = False
    #: a signed message older than this (seconds) is rejected
    auth_max_skew: int = 300

    # -- the client inbox (a data-only Redis Stream per federation) --------------------------
    #: largest inbox record accepted: Redis's append function refuses larger ones (and the pump drops them)
    max_inbox_record_bytes: int = Field(default=16 * 1024, ge=1, le=512 * 1024)
    #: records one client's inbox may hold (read or not) before the append function refuses more
    inbox_max_records: int = Field(default=64, ge=1)
    #: an entry stays pending until its verdict is stored; one pending this long (its pump or worker died,
    #: its task was lost) is claimed and queued again, so every record gets a verdict within about
    #: 4/3 of this after the services are back
    inbox_claim_idle_s: float = Field(default=30.0, gt=0)
    #: a client's inbox is not read while this many of its entries await their verdict (bounds the ingest
    #: queue per client; at most this plus one pass's worth, 64, are queued)
    inbox_max_in_flight: int = Field(default=8, ge=1)
    #: each inbox's rate budget: a token bucket refilled at this many records per second ...
    inbox_rate_per_s: float = Field(default=2.0, gt=0)
    #: ... holding at most this many; records over the budget are dropped and counted (``rate_limited``)
    inbox_burst: int = Field(default=30, ge=1)
    #: how long one pump read blocks waiting for records
    inbox_block_ms: int = 1000

    # -- bounds on what a client can claim or make a worker do ---------------------------------
    #: largest dataset size a client may claim
    max_dataset_size: float = 1e9
    #: rank_pattern / alpha_pattern entries accepted in an adapter_config (also bounded by the declared modules)
    max_pattern_entries: int = 1024
    #: largest LoRA rank accepted for any module (work grows with it; svd with its square)
    max_rank: int = Field(default=512, ge=1)

    #: Redis ACL users per client: ``auto`` creates them where the connection may (ACL SETUSER),
    #: ``on`` requires it, ``off`` never tries
    client_acl: Literal["auto", "on", "off"] = "auto"
    #: the Redis address clients use, for the connection URL ``client add`` prints
    #: (default: ``redis_url`` without its credentials)
    public_redis_url: str | None = None

    #: serve Prometheus metrics at ``/metrics`` on this port (``chorus-mq worker --metrics-port``)
    metrics_port: int | None = None

    #: run Celery tasks in the calling process (used by ``simulate``)
    eager: bool = False

    worker_concurrency: int | None = Field(default=None)
    #: a pool child whose resident memory passed this many MB is replaced after its task (0: never), so a
    #: worker's memory stays bounded over any number of rounds whatever a library keeps between tasks
    worker_max_memory_mb: int = Field(default=1536, ge=0)

    @model_validator(mode="after")
    def _ordered_limits(self) -> Settings:
        if not (self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout):
            raise ValueError(
                "need CHORUS_TASK_SOFT_TIME_LIMIT < CHORUS_TASK_TIME_LIMIT < CHORUS_VISIBILITY_TIMEOUT "
                "(Redis redelivers tasks still running past the visibility timeout)"
            )
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def lease_renew_interval(self) -> float:
        """How often a running task of a round renews its lease."""
        return self.aggregation_lease / 3


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
