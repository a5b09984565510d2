"""Sending work to the fleet by task name, or running it in-process when ``settings.eager``."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from ..settings import Settings
from .app import AGGREGATE_QUEUE, AGGREGATE_TASK, INGEST_QUEUE, INGEST_TASK, make_app


@lru_cache(maxsize=8)
def _app(settings_json: str) -> Celery:
    return make_app(Settings.model_validate_json(settings_json))


def _send(settings: Settings, name: str, queue: str, args: list) -> None:
    if settings.eager:
        from . import tasks  # registering the tasks needs the worker's imports
        tasks.app.tasks[name].apply(args=args, throw=True)
        return
    _app(settings.model_dump_json()).send_task(name, args=args, queue=queue)


def ingest(settings: Settings, message: dict) -> None:
    _send(settings, INGEST_TASK, INGEST_QUEUE, [message])


def aggregate(settings: Settings, federation: str, round_: int, epoch: int) -> None:
    _send(settings, AGGREGATE_TASK, AGGREGATE_QUEUE, [federation, round_, epoch])
