"""The Celery app. Start a worker with ``chorus-mq worker`` or ``celery -A chorus_mq.workers.app worker``."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from ..settings import Settings, get_settings

INGEST_QUEUE = "chorus.ingest"
AGGREGATE_QUEUE = "chorus.aggregate"
INGEST_TASK = "chorus.ingest"
AGGREGATE_TASK = "chorus.aggregate"
SWEEP_TASK = "chorus.close_due_rounds"


def make_app(settings: Settings) -> Celery:
    app = Celery("chorus_mq", broker=settings.effective_broker_url, include=["chorus_mq.workers.tasks"])
    # kombu scans for expired unacked messages only every interval x throttle seconds (100 s by
    # default), which would dwarf a short visibility timeout after a worker dies
    restore_every = min(max(settings.visibility_timeout // 10, 1), 10)
    transport = {"visibility_timeout": settings.visibility_timeout, "unacked_restore_interval": restore_every,
                 "unacked_restore_throttle": 1}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Redis redelivers anything unacked after the visibility timeout, so limits sit below it.
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # A killed pool child is retried a bounded number of times instead of acked and lost.
        task_retry_on_worker_lost=True,
        task_reject_on_worker_lost=False,
        task_queues=[Queue(INGEST_QUEUE), Queue(AGGREGATE_QUEUE)],
        task_default_queue=INGEST_QUEUE,
        task_routes={INGEST_TASK: {"queue": INGEST_QUEUE}, AGGREGATE_TASK: {"queue": AGGREGATE_QUEUE},
                     SWEEP_TASK: {"queue": AGGREGATE_QUEUE}},
        task_always_eager=settings.eager,
        task_eager_propagates=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule={"close-due-rounds": {"task": SWEEP_TASK, "schedule": settings.sweep_interval}},
        redbeat_redis_url=settings.redis_url,
        redbeat_lock_timeout=settings.beat_lock_timeout,
        redbeat_key_prefix="chorus:redbeat",
    )
    return app


app = make_app(get_settings())
