"""The Celery app, built lazily from explicit settings.

``chorus-mq worker`` (or ``celery -A chorus_mq.workers.app worker``) builds it from the
environment on first use; the SDK, beat and tests build one from their own settings.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import kombu
from celery import Celery

from ..names import TASK_QUEUES, Queue
from ..settings import Settings, get_settings
from .dispatch import Dispatcher


def make_app(settings: Settings) -> Celery:
    """A configured Celery app with chorus-mq's tasks registered."""
    from . import broker, crash

    broker.install()  # a failed ack must not stop a worker consuming (see broker.py)
    crash.install()  # nor may a worker hang for ever after an unrecoverable error (see crash.py)
    app = Celery("chorus_mq", broker=settings.effective_broker_url, set_as_current=False)
    # kombu scans for expired unacked messages only every interval x throttle seconds (100 s by
    # default), which would dwarf a short visibility timeout after a worker dies
    restore_every = min(max(settings.visibility_timeout // 10, 1), 10)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": restore_every,
        "unacked_restore_throttle": 1,
    }
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
        task_queues=[kombu.Queue(q.value) for q in Queue],  # type: ignore[attr-defined,no-untyped-call]
        task_default_queue=Queue.INGEST.value,
        task_routes={task.value: {"queue": queue.value} for task, queue in TASK_QUEUES.items()},
        task_always_eager=settings.eager,
        task_eager_propagates=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024 or None,  # KiB
    )
    from . import tasks  # the task bodies import torch: only when an app is built

    tasks.register(app, settings)
    return app


@lru_cache(maxsize=8)
def _cached(settings_json: str) -> Celery:
    return make_app(Settings.model_validate_json(settings_json))


def get_app(settings: Settings) -> Celery:
    """The app for ``settings`` (one per distinct settings in this process)."""
    return _cached(settings.model_dump_json())


def get_dispatcher(settings: Settings) -> Dispatcher:
    return Dispatcher(get_app(settings), eager=settings.eager)


def __getattr__(name: str) -> Any:
    # `celery -A chorus_mq.workers.app` looks up `app` here: build it from the environment then
    if name == "app":
        return get_app(get_settings())
    raise AttributeError(name)
