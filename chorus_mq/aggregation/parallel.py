"""Independent modules aggregated side by side, each on one torch thread.

A module's work is a few GEMMs plus small LAPACK calls and Python glue. Only the GEMMs use
more than one core, so on a 2-core machine two modules at once with one torch thread each
beat one module with two threads (svd on llama-3.2-3b shapes: ~1.25x; benchmarks/aggregate.py).
Every module runs on one torch thread whatever ``workers`` is, so results are bit-identical
for any worker count: a module's arithmetic never depends on what runs beside it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from chorus_mq.errors import AggregationError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for each item, ``workers`` at a time, yielded in the order of ``items``.

    ``items`` is consumed lazily in the caller's thread (load inputs there; compute in ``fn``)
    and at most ``workers + 1`` are in flight, so memory holds that many modules, not the
    model. The first exception, in item order, is re-raised and the rest are cancelled.
    """
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise AggregationError(f"workers must be a positive int, got {workers!r}")
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(
        workers, initializer=torch.set_num_threads, initargs=(1,), thread_name_prefix="chorus-module"
    ) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
