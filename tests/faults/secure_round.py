"""The set-up of the secure-round fault tests: a faulty worker and a beat, a secure ffa-lora federation of three
clients, and round 1 under way with the beat gone, so that only the worker closes phases (at quorum)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

import torch

from tests.training.clients import Clients
from tests.training.secure_rounds import create_secure_federation, random_update, round_public, secure_clients

CLIENTS = ("c0", "c1", "c2")


@dataclass
class SecureRound:
    """Round 1 of a secure federation, its clients' secure rounds running (:meth:`Clients.join` waits for them)."""

    worker: subprocess.Popen  # the faulty worker, paused at its hook
    sweep: dict[str, str]  # the environment of a beat that sweeps every 0.2 s
    operator: Any
    pub: Any
    updates: dict[str, dict[str, torch.Tensor]]
    clients: Clients


def start_secure_round(deployment, model_dir, fed: str, *, env: dict[str, str], pause: dict[str, str], seed: int):
    """Start a faulty worker (``pause``: where it stops, and ``env``) and a beat (``env``), create a secure ffa-lora
    federation of :data:`CLIENTS` (quorum 3), wait for round 1 to open, kill the beat, and start every client's
    secure round (timeout 240 s) with a random update seeded ``seed + i``."""
    torch.set_num_threads(1)
    worker = deployment.start_worker(faulty=True, env={**pause, **env})
    sweep = {"CHORUS_SWEEP_INTERVAL": "0.2", **env}
    beat = deployment.start_beat(env=sweep)
    create_secure_federation(deployment, model_dir, fed, quorum=len(CLIENTS), strategy="ffa-lora")
    operator = deployment.sdk()
    secrets = {c: operator.add_client(fed, c).secret for c in CLIENTS}
    pub = round_public(operator, fed, 1)
    deployment.kill(beat)  # from here only the worker closes phases (at quorum) and publishes
    updates = {c: random_update(pub, seed + i) for i, c in enumerate(CLIENTS)}
    clients = secure_clients(deployment, fed, secrets, updates, timeout=240)
    return SecureRound(worker, sweep, operator, pub, updates, clients)
