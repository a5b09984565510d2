"""An in-process secure round: real clients and a real aggregator, messages passed by hand."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

import numpy as np

from chorus_mq.secagg.client import SecAggClient
from chorus_mq.secagg.params import SecAggParams
from chorus_mq.secagg.server import SecAggResult, SecAggServer


def make_params(n: int = 10, length: int = 1000, **kw) -> SecAggParams:
    cohort = tuple(f"c{i:02d}" for i in range(n))
    return SecAggParams(federation="fed", round=3, cohort=cohort, length=length, graph_seed=b"s" * 32, **kw)


def inputs(params: SecAggParams, seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: (rng.standard_normal(params.length) * scale).astype(np.float32) for c in params.cohort}


def run_round(
    params: SecAggParams,
    xs: Mapping[str, np.ndarray],
    drop: Mapping[str, Collection[str]] | None = None,
    *,
    restart: bool = False,
) -> tuple[SecAggResult, SecAggServer, dict[str, SecAggClient]]:
    """One honest round; ``drop[phase]`` are the clients that fall silent at that phase. With ``restart`` every
    client is rebuilt from its saved state (through JSON, as a restarted ``upload`` reads it) before each phase."""
    drop = drop or {}
    gone: set[str] = set()
    clients = {c: SecAggClient(params, c) for c in params.cohort}
    server = SecAggServer(params)

    def resume() -> None:
        if restart:
            for c, client in list(clients.items()):
                clients[c] = SecAggClient.restore(params, json.loads(json.dumps(client.state())))

    resume()
    gone |= set(drop.get("advertise", ()))
    for c in params.cohort:
        if c not in gone:
            server.receive_advert(clients[c].advertise())
    adverts = server.close_advertise()

    resume()
    gone |= set(drop.get("share", ()))
    for c, theirs in adverts.items():
        if c not in gone:
            server.receive_shares(clients[c].share_keys(theirs))
    inbox = server.close_share()

    resume()
    gone |= set(drop.get("masked_input", ()))
    for c, sealed in inbox.items():
        if c not in gone:
            server.receive_masked(clients[c].masked_input(sealed, xs[c]))
    request = server.close_masked()

    resume()
    gone |= set(drop.get("unmask", ()))
    for c in sorted(request.survivors):
        if c not in gone:
            server.receive_unmask(clients[c].unmask(request))
    return server.finish(), server, clients


def oracle(xs: Mapping[str, np.ndarray], summed: Collection[str]) -> np.ndarray:
    return np.sum([xs[c].astype(np.float64) for c in sorted(summed)], axis=0)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
