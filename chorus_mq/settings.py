"""All configuration, from the environment (prefix ``CHORUS_``) or keyword overrides."""

from __future__ import annotations

from functools import lru_cache

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

    #: largest delta object accepted, checked before download
    max_delta_bytes: int = 2 * 1024**3
    #: largest safetensors header accepted
    max_header_bytes: int = 16 * 1024**2
    #: where workers spool downloaded deltas
    spool_dir: str | None = None

    #: Celery timing; must satisfy soft < hard < visibility timeout
    task_soft_time_limit: int = 1500
    task_time_limit: int = 1800
    visibility_timeout: int = 3600
    #: an aggregation not finalized after this long is re-enqueued by the sweep
    aggregation_lease: int = 1900
    #: modules aggregated side by side, one torch thread each (default: the cores available)
    aggregation_workers: int | None = Field(default=None, ge=1)
    #: beat period for ``close_due_rounds``
    sweep_interval: float = 5.0
    #: redbeat lock timeout (short, for fast failover)
    beat_lock_timeout: int = 30
    task_max_retries: int = 5
    #: an aggregation reclaimed this many times (it keeps dying or timing out) fails its round
    max_aggregation_attempts: int = 3

    #: events stream is trimmed to about this many entries per federation
    events_maxlen: int = 100_000

    #: accept unsigned messages from unregistered clients: local development only.
    #: Registered clients must sign whatever this says.
    allow_unsigned: bool = False
    #: a signed message older than this (seconds) is rejected
    auth_max_skew: int = 300

    #: run Celery tasks in the calling process (used by ``simulate``)
    eager: bool = False

    worker_concurrency: int | None = Field(default=None)

    @model_validator(mode="after")
    def _ordered_limits(self) -> "Settings":
        if not (self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout):
            raise ValueError(
                "need CHORUS_TASK_SOFT_TIME_LIMIT < CHORUS_TASK_TIME_LIMIT < CHORUS_VISIBILITY_TIMEOUT "
                "(Redis redelivers tasks still running past the visibility timeout)"
            )
        if self.aggregation_lease <= self.task_time_limit:
            raise ValueError("CHORUS_AGGREGATION_LEASE must exceed CHORUS_TASK_TIME_LIMIT")
        return self

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
