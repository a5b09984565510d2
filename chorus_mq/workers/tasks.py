"""Celery tasks: thin, idempotent wrappers; Redis state decides what actually happens.

Every task is safe to run twice or concurrently: the round's epoch fences commits, outputs are
write-once content-addressed objects, and each state change is one Lua transition.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import redis as redis_lib
from celery import Celery, bootsteps
from celery.signals import worker_process_init

from ..errors import ServiceUnavailable, StoreError
from ..names import Queue, Task
from ..settings import Settings
from . import runtime
from .dispatch import Dispatcher

log = logging.getLogger(__name__)

#: worth retrying with backoff; everything else is a verdict or a bug
TRANSIENT = (StoreError, ServiceUnavailable, redis_lib.ConnectionError, redis_lib.TimeoutError, OSError)


def register(app: Celery, settings: Settings) -> None:
    """Register chorus-mq's tasks (and the inbox pump of ingest workers) on ``app``."""
    # a retry is a delayed task: its delay stays well below the visibility timeout (kombu#337)
    retry: dict[str, Any] = {
        "shared": False,  # registered on this app only: one process may hold apps for several settings
        "autoretry_for": TRANSIENT,
        "retry_backoff": 1,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": settings.task_max_retries,
        "acks_late": True,
        "default_retry_delay": min(10, settings.visibility_timeout // 10),
    }
    dispatch = Dispatcher(app, eager=settings.eager)

    @app.task(name=Task.INGEST.value, **retry)  # type: ignore[untyped-decorator]
    def ingest_task(federation: str, inbox_client: str, entry_id: str, message: Any) -> dict[str, Any]:
        from .ingest import ingest

        return ingest(runtime.current(), federation, inbox_client or None, entry_id, message, dispatch).as_dict()

    @app.task(name=Task.ROUND.value, **retry)  # type: ignore[untyped-decorator]
    def round_task(federation: str, round_: int, epoch: int) -> str:
        from .plan import plan_round

        return plan_round(runtime.current(), federation, round_, epoch, dispatch)

    @app.task(name=Task.SHARD.value, **retry)  # type: ignore[untyped-decorator]
    def shard_task(federation: str, round_: int, epoch: int, shard: int) -> str:
        from .shard import run_shard

        return run_shard(runtime.current(), federation, round_, epoch, shard, dispatch)

    @app.task(name=Task.COMMIT.value, **retry)  # type: ignore[untyped-decorator]
    def commit_task(federation: str, round_: int, epoch: int) -> str:
        from .commit import commit_round

        return commit_round(runtime.current(), federation, round_, epoch, dispatch)

    @app.task(name=Task.COMPACT.value, **retry)  # type: ignore[untyped-decorator]
    def compact_task(federation: str, round_: int) -> str:
        from .compact import compact

        return compact(runtime.current(), federation, round_)

    @app.task(name=Task.SECURE_UNMASK.value, **retry)  # type: ignore[untyped-decorator]
    def secure_unmask_task(federation: str, round_: int, mode: str) -> str:
        from .secure_sum import plan_unmask

        return plan_unmask(runtime.current(), federation, round_, mode, dispatch)

    @app.task(name=Task.SECURE_SHARD.value, **retry)  # type: ignore[untyped-decorator]
    def secure_shard_task(federation: str, round_: int, epoch: int, shard: int) -> str:
        from .secure_sum import run_secure_shard

        return run_secure_shard(runtime.current(), federation, round_, epoch, shard, dispatch)

    @app.task(name=Task.SECURE_COMMIT.value, **retry)  # type: ignore[untyped-decorator]
    def secure_commit_task(federation: str, round_: int, epoch: int) -> str:
        from .secure_sum import commit_secure

        return commit_secure(runtime.current(), federation, round_, epoch)

    app.steps["worker"].add(InboxPumpStep)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _per_process(**_: Any) -> None:
    # Pool children run one task at a time; torch's default threads would oversubscribe the cores
    # (validation on a busy host ran 100x slower). Modules run side by side on their own threads.
    import torch

    from .memory import retain_freed_memory

    torch.set_num_threads(1)
    retain_freed_memory()


class InboxPumpStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the inbox pump in the main process of every worker that consumes the ingest queue."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.pump: Any = None

    def start(self, worker: Any) -> None:
        consumed = worker.app.amqp.queues.consume_from or worker.app.amqp.queues
        if Queue.INGEST.value not in set(consumed):
            return
        from .pump import InboxPump

        rt = runtime.current()
        self.pump = InboxPump(rt, Dispatcher(worker.app), consumer=f"{worker.hostname}")
        self.pump.start()

    def stop(self, worker: Any) -> None:
        if self.pump is not None:
            self.pump.stop()
