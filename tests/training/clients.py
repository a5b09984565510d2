"""A federation's clients as the end-to-end tests run them: the federation created by the CLI, each client on its
own thread (the SDK's ``train`` or any callable) or as a ``chorus-mq train`` process; the main thread waits and
reports every client's failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: a ``chorus-mq train`` process runs torch on one thread (the deployment's processes share the cores)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def create_federation(
    deployment, fed: str, model_dir, labels: tuple[str, ...], *extra: str, quorum: int, rank: int = 4
) -> None:
    """``chorus-mq federation create``: a seq-cls federation of ``labels``, LoRA rank ``rank`` on query/value."""
    deployment.cli(
        "federation", "create", fed, "--base-model", str(model_dir), "--quorum", str(quorum), "--task", "seq-cls",
        "--labels", ",".join(labels), "--target-modules", "query,value", "--lora-rank", str(rank), *extra,
    )  # fmt: skip


class Clients:
    """``target(client)`` running for every client on its own thread; what raises is kept for :meth:`join`."""

    def __init__(self, target: Callable[[str], Any], clients: Iterable[str]):
        self.results: dict[str, Any] = {}
        self.failures: list[BaseException] = []

        def run(client: str) -> None:
            try:
                self.results[client] = target(client)
            except BaseException as exc:  # reported by the main thread
                self.failures.append(exc)

        self.threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 180) -> dict[str, Any]:
        """Wait for every thread (``timeout`` each) and fail with what any raised; each client's return value."""
        for t in self.threads:
            t.join(timeout=timeout)
        assert not self.failures, self.failures
        return self.results


def run_clients(target: Callable[[str], Any], clients: Iterable[str], timeout: float = 180) -> dict[str, Any]:
    """Run ``target(client)`` for every client at once, each on its own thread; see :meth:`Clients.join`."""
    return Clients(target, clients).join(timeout)


def train(deployment, fed: str, client: str, secret: str, **options: Any) -> list:
    """One session of the SDK's ``train`` as ``client`` (JSON records, timeout 300 s, polling every 0.1 s unless
    ``options`` say otherwise); its round records."""
    sdk = deployment.sdk(client_secret=secret)
    return list(sdk.train(federation=fed, client_id=client, **{"json": True, "timeout": 300, "poll": 0.1, **options}))


def train_all(
    deployment, fed: str, secrets: dict[str, str], data: Callable[[str], Any], workdir: Path, **options: Any
) -> dict[str, list]:
    """Every client of ``secrets`` runs :func:`train` at once on ``data(client)``, its work dir ``workdir / client``;
    wait (up to 900 s) and fail with what any raised; each client's round records."""
    return run_clients(
        lambda c: train(deployment, fed, c, secrets[c], data=data(c), workdir=workdir / c, **options), secrets, 900
    )


def train_process(deployment, fed: str, client: str, secret: str, *args: str):
    """``chorus-mq train -f FED --client-id CLIENT ARGS...`` as a process (torch on one thread)."""
    return deployment.popen_cli(
        "train", "-f", fed, "--client-id", client, *args, env={**ONE_THREAD, "CHORUS_CLIENT_SECRET": secret}
    )


def train_records(proc, timeout: float, what: str = "train") -> tuple[list[dict], str]:
    """Wait for a ``chorus-mq train --json`` process, which must succeed; its JSON records and its stderr."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{out}\n{err[-4000:]}"
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err
