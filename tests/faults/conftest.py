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
import torch

from chorus_mq.names import ENDED_STATES
from chorus_mq.state import RoundState

from ..deltas import make_federation, random_factors, write_adapter
from ..topology import Deployment, wait_for
from .faulty_app import arrivals
from .invariants import Accepted

TRIALS = os.environ.get("CHORUS_FAULT_TRIALS")
#: the modules of the tiny deltas (two 16x12 modules) and of the wide ones (four: up to four shards)
MODULES = ("layers.0.q", "layers.0.v")
WIDE = ("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v")

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log drowns failure reports
torch.set_num_threads(1)  # the reference runs share two cores with the deployment's processes


#: every fault test's marks: it starts real services and processes
MARKS = [pytest.mark.faults, pytest.mark.services]


def trials(n: int = 3):
    """Repeat a fault test ``n`` times, or ``CHORUS_FAULT_TRIALS`` (the fault lands at another moment each time)."""
    return pytest.mark.parametrize("trial", range(int(TRIALS) if TRIALS else n))


def timing(soft: int, hard: int, visibility: int, lease: int) -> dict[str, str]:
    """Settings for short tasks: soft < hard time limit < visibility timeout."""
    assert soft < hard < visibility
    return {
        "CHORUS_TASK_SOFT_TIME_LIMIT": str(soft),
        "CHORUS_TASK_TIME_LIMIT": str(hard),
        "CHORUS_VISIBILITY_TIMEOUT": str(visibility),
        "CHORUS_AGGREGATION_LEASE": str(lease),
    }


def _delta_files(tmp_path_factory, name: str, modules: tuple[str, ...]):
    root = tmp_path_factory.mktemp(name)
    cache: dict[int, Path] = {}

    def make(i: int) -> Path:
        if i not in cache:
            factors = random_factors(1000 + i, modules=modules, r=(2, 4)[i % 2])
            cache[i] = write_adapter(root / f"delta{i}.safetensors", factors)
        return cache[i]

    return make


@pytest.fixture(scope="session")
def delta_file(tmp_path_factory):
    """``delta_file(i)``: a tiny delta (two 16x12 modules; rank 2 or 4, alpha 8: mixed scalings)."""
    return _delta_files(tmp_path_factory, "deltas", MODULES)


@pytest.fixture(scope="session")
def wide_delta_file(tmp_path_factory):
    """``wide_delta_file(i)``: like :func:`delta_file` with four modules, so a round can take four shards."""
    return _delta_files(tmp_path_factory, "wide-deltas", WIDE)


def federation(sdk, name: str, *, quorum: int, modules: tuple[str, ...] = MODULES, **config) -> None:
    """Create federation ``name`` declaring the shapes of the test deltas (``modules``)."""
    make_federation(sdk, name, quorum=quorum, factors=random_factors(0, modules=modules), base_model="tiny", **config)


def size_of(i: int) -> float:
    """The dataset size client ``i`` reports (distinct, so the weights are not all equal)."""
    return float(100 + 37 * i)


def upload(
    sdk, federation: str, client: str, path: Path, size: float | None, *, timeout: float = 120, **kwargs
) -> Accepted:
    """Upload and wait for the worker's verdict; an acceptance becomes an :class:`Accepted`."""
    res = sdk.upload(federation, path, client, dataset_size=size, timeout=timeout, **kwargs)
    assert res.status in ("accepted", "duplicate"), res
    return Accepted(client, res.round, res.sha256)


def upload_all(sdk, federation: str, clients, delta_file, **kwargs) -> list[Accepted]:
    """Upload client ``i``'s ``delta_file(i)`` for every ``i`` in ``clients`` at once; their acceptances in order."""
    clients = list(clients)
    sdk.store.exists("warm-up")  # one boto3 client for every thread
    results: dict[int, Accepted | BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = upload(sdk, federation, f"c{i}", delta_file(i), size_of(i), **kwargs)
        except BaseException as exc:  # re-raised below, with the client
            results[i] = exc

    in_threads(one, [(i,) for i in clients])
    failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert not failed, f"uploads without an acceptance: {failed}"
    return [results[i] for i in clients]


def wait_round(dep: Deployment, federation: str, r: int, timeout: float = 120) -> str:
    """Wait until round ``r`` ended (complete, failed, expired or aborted); return its state."""
    state = RoundState(dep.redis())
    return wait_for(
        lambda: (s := state.round(federation, r).state) in ENDED_STATES and str(s),
        timeout,
        f"round {r} of {federation} to finish",
    )


def wait_hook(dep: Deployment, point: str, federation: str, subject: object, run: int = 1, timeout: float = 60) -> int:
    """Wait until arrival number ``run`` of ``subject`` at the faulty app's hook ``point``; its pid."""
    redis = dep.redis()

    def arrived() -> int | None:
        pids = arrivals(redis, point, federation, subject)
        return pids[run - 1] if len(pids) >= run else None

    return wait_for(arrived, timeout, f"run {run} of {federation} {subject} to reach the {point} hook")


def worker_of(dep: Deployment, pid: int):
    """The worker (of ``dep``) whose process group holds ``pid``: its main process or a pool child."""
    import psutil

    for proc in dep.workers:
        if proc.poll() is None and pid in {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())}:
            return proc
    raise AssertionError(f"pid {pid} belongs to no running worker")


def in_threads(target, argsets) -> None:
    """Run ``target(*args)`` for every ``args`` in ``argsets``, each on its own thread; wait for all."""
    threads = [threading.Thread(target=target, args=args) for args in argsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
