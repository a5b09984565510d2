"""Fault tests: real process topologies on loopback (tests/topology.py), faults injected on purpose.

Each fault test is repeated a few times (2 or 3; ``CHORUS_FAULT_TRIALS=N`` runs every one N
times, for a soak) and ends with :func:`tests.faults.invariants.assert_exactly_once`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from chorus_mq.state import RoundState

from ..deltas import random_factors, write_adapter
from ..topology import Deployment, wait_for
from .faulty_app import hook_pid
from .invariants import Accepted

TRIALS = os.environ.get("CHORUS_FAULT_TRIALS")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log drowns failure reports


def trials(n: int = 3):
    """Repeat a fault test ``n`` times, or ``CHORUS_FAULT_TRIALS`` (the fault lands at another moment each time)."""
    return pytest.mark.parametrize("trial", range(int(TRIALS) if TRIALS else n))


def timing(soft: int, hard: int, visibility: int, lease: int) -> dict[str, str]:
    """Settings for short tasks: soft < hard time limit < visibility timeout, lease > hard limit."""
    assert soft < hard < visibility and lease > hard
    return {"CHORUS_TASK_SOFT_TIME_LIMIT": str(soft), "CHORUS_TASK_TIME_LIMIT": str(hard),
            "CHORUS_VISIBILITY_TIMEOUT": str(visibility), "CHORUS_AGGREGATION_LEASE": str(lease)}


@pytest.fixture(scope="session")
def delta_file(tmp_path_factory):
    """``delta_file(i)``: a tiny delta (two 16x12 modules; rank 2 or 4, alpha 8: mixed scalings)."""
    root = tmp_path_factory.mktemp("deltas")
    cache: dict[int, Path] = {}

    def make(i: int) -> Path:
        if i not in cache:
            cache[i] = write_adapter(root / f"delta{i}.safetensors", random_factors(1000 + i, r=(2, 4)[i % 2]))
        return cache[i]

    return make


def size_of(i: int) -> float:
    """The dataset size client ``i`` reports (distinct, so the weights are not all equal)."""
    return float(100 + 37 * i)


def upload(sdk, federation: str, client: str, path: Path, size: float | None, *, timeout: float = 120,
           **kwargs) -> Accepted:
    """Upload and wait for the worker's verdict; an acceptance becomes an :class:`Accepted`."""
    res = sdk.upload(federation, path, client, dataset_size=size, timeout=timeout, **kwargs)
    assert res.status in ("accepted", "duplicate"), res
    return Accepted(client, res.round, res.sha256)


def wait_round(dep: Deployment, federation: str, r: int, timeout: float = 120) -> str:
    """Wait until round ``r`` is complete or failed; return which."""
    state = RoundState(dep.redis())
    return wait_for(lambda: (s := state.round(federation, r)["state"]) in ("complete", "failed") and s,
                    timeout, f"round {r} of {federation} to finish")


def wait_hook(dep: Deployment, federation: str, r: int, run: int = 1, timeout: float = 60) -> int:
    """Wait until run ``run`` of round ``r``'s aggregation is paused in the faulty app's hook; its pid."""
    redis = dep.redis()
    return wait_for(lambda: hook_pid(redis, federation, r, run), timeout,
                    f"aggregation run {run} of {federation} round {r} to reach the fault hook")


def in_threads(target, argsets) -> None:
    """Run ``target(*args)`` for every ``args`` in ``argsets``, each on its own thread; wait for all."""
    threads = [threading.Thread(target=target, args=args) for args in argsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
