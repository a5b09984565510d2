"""Celery tasks: thin, idempotent wrappers; Redis state decides what actually happens."""

from __future__ import annotations

import redis as redis_lib
from celery.utils.log import get_task_logger

from ..errors import ServiceUnavailable, StoreError
from ..settings import get_settings
from . import dispatch, runtime
from .aggregate import aggregate_round
from .app import AGGREGATE_TASK, INGEST_TASK, SWEEP_TASK, app
from .ingest import ingest
from .sweep import close_due_rounds

log = get_task_logger(__name__)

#: worth retrying with backoff; everything else is a verdict or a bug
TRANSIENT = (StoreError, ServiceUnavailable, redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)
# a retry is a delayed task: its delay stays well below the visibility timeout (kombu#337)
_RETRY = dict(autoretry_for=TRANSIENT, retry_backoff=1, retry_backoff_max=60, retry_jitter=True,
              max_retries=get_settings().task_max_retries, acks_late=True,
              default_retry_delay=min(10, get_settings().visibility_timeout // 10))


def enqueue_aggregate(federation: str, round_: int, epoch: int) -> None:
    dispatch.aggregate(runtime.current().settings, federation, round_, epoch)


@app.task(name=INGEST_TASK, bind=True, **_RETRY)
def ingest_task(self, message: dict) -> dict:
    return ingest(runtime.current(), message, enqueue_aggregate).as_dict()


@app.task(name=AGGREGATE_TASK, bind=True, **_RETRY)
def aggregate_task(self, federation: str, round_: int, epoch: int) -> str:
    return aggregate_round(runtime.current(), federation, round_, epoch)


@app.task(name=SWEEP_TASK, bind=True, **_RETRY)
def close_due_rounds_task(self) -> dict:
    return close_due_rounds(runtime.current(), enqueue_aggregate)
