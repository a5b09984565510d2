"""Real services for tests: a private redis-server per session on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis


def spawn_logged(log_path: Path, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``python ARGV`` in its own process group (so a test can kill its whole tree), output to ``log_path``."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
    proc.name, proc.log_path = log_path.stem, log_path  # type: ignore[attr-defined]
    return proc


#: the production CLI, as ``python -m`` runs it
CLI = "chorus_mq.cli"


def run_cli(
    args: tuple[str, ...], env: dict[str, str], cwd: Path, *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """``chorus-mq ARGS`` in a subprocess; with ``check``, a non-zero exit fails the test with its output."""
    res = subprocess.run(
        [sys.executable, "-m", CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"chorus-mq {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s.

    A liveness bound, not a timing assertion: timeouts are generous.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server we own: tests may kill it, restart it (AOF keeps the data) or CLIENT KILL."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        args: tuple[str, ...] = (),
        username: str | None = None,
        password: str | None = None,
        config: Path | None = None,
    ):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: install the Debian package redis-server (.ci/run does this)"
            )
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.args = args
        #: a redis.conf (deploy/redis/redis.conf) read first; this fixture's own options override it
        self.config = config
        self.username, self.password = username, password

    @property
    def url(self) -> str:
        return self.url_for(self.username, self.password)

    def url_for(self, username: str | None, password: str | None) -> str:
        auth = f"{username}:{password}@" if username else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                *([str(self.config)] if self.config else []),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1, username=self.username, password=self.password).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, sig_kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if sig_kill else self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self, sig_kill: bool = False) -> None:
        self.stop(sig_kill)
        self.start()

    def client(self, **kw) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, **kw)


#: the Redis configuration the deployment ships (compose mounts it; production notes use it)
REDIS_CONF = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "redis.conf"


class GatewayProcess:
    """``chorus-mq redis-gateway`` in front of a RedisServer, as a subprocess on a free loopback port."""

    def __init__(self, workdir: Path, redis_port: int, *options: str, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.argv = [
            "-m",
            CLI,
            "redis-gateway",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--redis",
            f"127.0.0.1:{redis_port}",
            *options,
        ]
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        import os

        self.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), **self.env}
        self.proc = spawn_logged(self.workdir / "gateway.log", self.argv, env, root)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 60, "the gateway to listen")
        return self

    def log(self) -> str:
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


def start_shipped_redis(workdir: Path, *args: str) -> RedisServer:
    """redis-server as deployed: deploy/redis/redis.conf and a writable copy of deploy/redis/users.acl, logged in
    as the shipped ``operator`` (``args`` override the file, as this fixture's own port and directory do)."""
    root = Path(__file__).resolve().parents[1]
    workdir.mkdir(parents=True, exist_ok=True)
    acl = workdir / "users.acl"
    shutil.copy(root / "deploy" / "redis" / "users.acl", acl)
    return RedisServer(
        workdir / "data",
        args=("--aclfile", str(acl), *args),
        username="operator",
        password="operator-dev-password",
        config=REDIS_CONF,
    ).start()
