"""Prometheus metrics, names prefixed ``chorus_``, that work with Celery's prefork pool.

``chorus-mq worker --metrics-port PORT`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory *before* this module is imported, so every pool child writes its samples there and
the main process serves their sum at ``/metrics`` (prometheus-client's multiprocess mode).
Without a port, the metrics are plain in-process counters that nobody scrapes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Metrics:
    deltas: Counter
    rounds: Counter
    round_seconds: Histogram
    phase_seconds: Histogram
    bytes_in: Counter
    bytes_out: Counter
    shards_in_flight: Gauge
    fetches: Counter
    reclaimed: Counter


def _build() -> Metrics:
    return Metrics(
        deltas=Counter("chorus_deltas", "Inbox records and deltas by outcome and reason code", ["outcome", "code"]),
        rounds=Counter("chorus_rounds", "Rounds by end state", ["state"]),
        round_seconds=Histogram(
            "chorus_round_seconds", "Seconds from a round's quorum to its commit", buckets=_PHASE_BUCKETS
        ),
        phase_seconds=Histogram(
            "chorus_phase_seconds",
            "Seconds per aggregation phase (summed over a task)",
            ["phase"],
            buckets=_PHASE_BUCKETS,
        ),
        bytes_in=Counter("chorus_bytes_in", "Bytes read from the store by workers", ["task"]),
        bytes_out=Counter("chorus_bytes_out", "Bytes written to the store by workers", ["task"]),
        # livesum: the running shards of every live pool child, summed (only used in multiprocess mode)
        shards_in_flight=Gauge("chorus_shards_in_flight", "Shard tasks running now", multiprocess_mode="livesum"),
        fetches=Counter("chorus_delta_fetches", "Delta objects fetched and hashed by ingest (repeats are not)"),
        reclaimed=Counter("chorus_inbox_reclaimed", "Inbox entries claimed again: their verdict was late"),
    )


METRICS = _build()


class _QueueDepth:
    """Collected at scrape time in the serving process: the length of each Celery queue."""

    def __init__(self, broker: Any, queues: list[str]):
        self.broker, self.queues = broker, queues

    def collect(self) -> Any:
        family = GaugeMetricFamily("chorus_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue in self.queues:
            try:
                family.add_metric([queue], float(self.broker.llen(queue)))
            except Exception as exc:  # a scrape must not fail because the broker blinked
                log.debug("queue depth of %s: %s", queue, exc)
        yield family


def serve(port: int, *, broker: Any, queues: list[str]) -> CollectorRegistry:
    """Serve ``/metrics`` on ``port`` from this (the worker's main) process."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(_QueueDepth(broker, queues))
    start_http_server(port, registry=registry)
    log.info("metrics on :%d/metrics", port)
    return registry
