"""Secure rounds as the end-to-end and fault tests drive them: the federation created by the CLI, every client's
``ChorusClient.secure_round`` on its own thread, and the published adapter checked against the float64 oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load

from chorus_mq.results import fetch_manifest
from chorus_mq.secagg.public import RoundPublic
from chorus_mq.state.secagg import SecAggRounds

from ..services import wait_for
from .clients import Clients, create_federation

LABELS = ("awful", "great", "okay")
F64 = torch.float64
#: the worker unmasks one tensor a shard (the sharded unmask, as at real shapes)
SHARDED = {"CHORUS_SHARD_BYTES": "1"}
#: the factors a round keeps as published, by what it trains (Fed-SB trains R between both)
FROZEN = {"lora_B": ("lora_A",), "lora_A": ("lora_B",), "lora_R": ("lora_A", "lora_B")}


class Stop(Exception):
    """Raised from a client's phase callback: the client falls silent there."""


def create_secure(
    deployment, model_dir, fed: str, clients: list[str], *extra: str, strategy: str = "ffa-lora"
) -> dict[str, str]:
    """A worker (sharded unmask) and a beat; a secure federation of ``clients`` (the quorum); each one's secret."""
    deployment.start_worker(concurrency=1, env=SHARDED)
    deployment.start_beat(env={"CHORUS_SWEEP_INTERVAL": "0.2"})
    create_secure_federation(deployment, model_dir, fed, *extra, quorum=len(clients), strategy=strategy)
    operator = deployment.sdk()
    return {c: operator.add_client(fed, c).secret for c in clients}


def create_secure_federation(deployment, model_dir, fed: str, *extra: str, quorum: int, strategy: str) -> None:
    """``chorus-mq federation create --secure-aggregation`` with ``strategy`` over :data:`LABELS`."""
    create_federation(
        deployment, fed, model_dir, LABELS, "--strategy", strategy, "--secure-aggregation", *extra, quorum=quorum
    )


def round_public(sdk, fed: str, r: int) -> RoundPublic:
    """Round ``r``'s public secure-aggregation parameters, once it opened."""
    rounds = SecAggRounds(sdk.redis, fed)
    raw = wait_for(lambda: rounds.public_params(r), 60, f"round {r}'s secure aggregation to open")
    return RoundPublic.from_dict(raw)


def random_update(pub: RoundPublic, seed: int) -> dict[str, torch.Tensor]:
    """A client's update: a small random tensor for every entry of the round's layout."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float32) * 0.05 for k, shape in pub.layout.entries}


def secure_clients(
    deployment,
    fed: str,
    secrets: dict[str, str],
    updates: dict[str, dict[str, torch.Tensor]],
    *,
    round_: int = 1,
    timeout: float = 120,
    silent_at: dict[str, str] | None = None,
    on_phase: Callable[[str, str], None] | None = None,
    on_stop: Callable[[str], None] | None = None,
) -> Clients:
    """Every client of ``secrets`` runs ``secure_round`` of ``round_`` with its update, each on its own thread;
    :meth:`Clients.join` gives each one's result. ``on_phase(client, phase)`` sees every phase a client reaches; a
    client ``silent_at`` names falls silent at that phase (:class:`Stop` raised from its callback), then runs
    ``on_stop(client)``, and its result is None."""
    silent = silent_at or {}

    def run(c: str):
        def phase_reached(_r: int, phase: str) -> None:
            if on_phase is not None:
                on_phase(c, phase)
            if silent.get(c) == phase:
                raise Stop(phase)

        sdk = deployment.sdk(client_secret=secrets[c])
        try:
            return sdk.secure_round(
                fed, c, updates[c], round_=round_, timeout=timeout, poll=0.05, on_phase=phase_reached
            )
        except Stop:
            if on_stop is not None:
                on_stop(c)
            return None

    return Clients(run, secrets)


def fetch_published(sdk, fed: str, r: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """Round ``r``'s manifest and every tensor it publishes: its shards', and its frozen factors from the objects its
    manifest refers to (``frame``: where they were last written), of which only those factors are taken."""
    manifest, _ = fetch_manifest(sdk.state, sdk.store, fed, r)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest.shards:
        tensors.update(load(sdk.store.get_bytes(shard.adapter.key)))
    if manifest.frame is not None:
        suffixes = tuple(f".{f}.weight" for f in manifest.frame.factors)
        assert not any(k.endswith(suffixes) for k in tensors), "a round that refers to its frozen factors stores none"
        for shard in manifest.frame.shards:
            framed = load(sdk.store.get_bytes(shard.adapter.key))
            tensors.update({k: t for k, t in framed.items() if k.endswith(suffixes)})
    return manifest, tensors


def check_exact(sdk, fed: str, r: int, pub: RoundPublic, updates: dict[str, dict[str, torch.Tensor]], summed):
    """Round ``r`` published the float64 oracle's weighted mean of ``summed``'s updates (1e-5), no residual, and
    its frozen factors bit for bit as the round's start had them; its manifest."""
    manifest, got = fetch_published(sdk, fed, r)
    _, start = fetch_published(sdk, fed, pub.start)
    assert manifest.secure is not None and manifest.secure["summed"] == sorted(summed)
    assert manifest.residual_bytes == 0 and all(s.residual is None for s in manifest.shards)
    total = sum(pub.weights[c] for c in summed)
    for key, _shape in pub.layout.entries:
        want = sum(updates[c][key].to(F64) * pub.weights[c] for c in summed) / total
        err = float((got[key].to(F64) - want).norm() / want.norm())
        assert err <= 1e-5, (key, err)
    suffixes = tuple(f".{f}.weight" for f in FROZEN[pub.trainable])
    frozen = [k for k in start if k.endswith(suffixes)]
    assert frozen and all(torch.equal(got[k], start[k]) for k in frozen)  # the frozen factor, bit for bit
    # stored once: the round refers to the objects that last wrote it (its start's, or the frame its start refers to)
    start_manifest, _ = fetch_manifest(sdk.state, sdk.store, fed, pub.start)
    assert manifest.frame is not None and manifest.frame.factors == tuple(FROZEN[pub.trainable])
    assert manifest.frame.shards == start_manifest.frame_source(FROZEN[pub.trainable]).shards
    return manifest
