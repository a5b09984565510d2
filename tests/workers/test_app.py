"""The Celery app is built from explicit settings."""

from __future__ import annotations

from chorus_mq.settings import Settings
from chorus_mq.workers.app import make_app


def test_pool_children_past_the_memory_bound_are_replaced_by_default():
    assert make_app(Settings()).conf.worker_max_memory_per_child == 1536 * 1024  # KiB, as Celery counts
    assert make_app(Settings(worker_max_memory_mb=400)).conf.worker_max_memory_per_child == 400 * 1024
    assert make_app(Settings(worker_max_memory_mb=0)).conf.worker_max_memory_per_child is None


def test_the_app_takes_its_broker_from_the_settings_it_is_given():
    app = make_app(Settings(redis_url="redis://127.0.0.1:1/3"))
    assert app.conf.broker_url == "redis://127.0.0.1:1/3"
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
