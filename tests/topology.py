"""Real process topologies on loopback: a private redis-server, moto S3 and chorus-mq processes.

Used by the end-to-end tests and the fault tests. Every process a :class:`Deployment`
starts runs in its own process group, so a test can SIGKILL a whole worker (main
process and pool children) and teardown never leaves one behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from chorus_mq.names import WorkerRole
from chorus_mq.settings import Settings

from .services import CLI, run_cli, spawn_logged, wait_for

ROOT = Path(__file__).resolve().parents[1]
#: the module ``python -m`` runs for a worker or beat: the production CLI (``CLI``) ...
#: ... or the same CLI with test-only faults switched on by CHORUS_FAULT_* variables
FAULTY_CLI = "tests.faults.faulty_app"


class Deployment:
    """One deployment: ``env`` is what every process it starts sees (CHORUS_* settings)."""

    def __init__(self, env: dict[str, str], workdir: Path, redis_url: str):
        self.env = env
        self.workdir = workdir
        self.redis_url = redis_url
        self.workers: list[subprocess.Popen] = []
        self.procs: list[subprocess.Popen] = []  # every process started: workers, beats, watchers

    # -- settings and in-process handles ---------------------------------------------

    def settings(self, **overrides: Any) -> Settings:
        """The Settings the deployment's processes build from ``env``, for in-process clients."""
        values = {
            k.removeprefix("CHORUS_").lower(): v
            for k, v in self.env.items()
            if k.startswith("CHORUS_") and not k.startswith("CHORUS_FAULT_")
        }
        return Settings(**{**values, **overrides})

    def sdk(self, **overrides: Any):
        from chorus_mq.client import ChorusClient

        return ChorusClient(self.settings(**overrides))

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    # -- the CLI ---------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return run_cli(args, {**self.env, **(env or {})}, ROOT, timeout=timeout, check=check)

    def popen_cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", CLI, *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    # -- services --------------------------------------------------------------------

    def _spawn(self, kind: str, module: str, args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        log_path = self.workdir / f"{kind}{len(self.procs)}-{uuid.uuid4().hex[:6]}.log"
        proc = spawn_logged(log_path, ["-m", module, *args], {**self.env, **(env or {})}, ROOT)
        self.procs.append(proc)
        return proc

    def start_worker(
        self,
        *extra: str,
        role: WorkerRole | str = WorkerRole.ALL,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        faulty: bool = False,
        wait: bool = True,
    ) -> subprocess.Popen:
        """``chorus-mq worker --role ROLE`` in its own process group; ``faulty`` runs it through
        tests/faults/faulty_app. ``proc.hostname`` is its node name (its inbox pump's consumer name)."""
        hostname = f"w{len(self.procs)}-{uuid.uuid4().hex[:6]}"
        proc = self._spawn(
            "worker",
            FAULTY_CLI if faulty else CLI,
            [
                "worker",
                "--role",
                str(role),
                "--concurrency",
                str(concurrency),
                "-l",
                "INFO",
                "--hostname",
                f"{hostname}@%h",
                *extra,
            ],
            env,
        )
        proc.hostname = hostname
        self.workers.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, *workers: subprocess.Popen) -> None:
        """Wait until every worker given (started with ``wait=False``, say, to start several at once) is ready."""
        for proc in workers:
            wait_for(lambda proc=proc: _ready(proc), 90, f"worker {proc.name} to be ready")

    def start_beat(self, env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen:
        """``chorus-mq beat`` (the sweep loop) in its own process group."""
        proc = self._spawn("beat", CLI, ["beat", "-l", "INFO"], env)
        if wait:
            wait_for(lambda: _logged(proc, "beat: sweeping every"), 90, f"beat {proc.name} to start")
        return proc

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        return proc.log_path.read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal the process's whole group (a worker's main process and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)

    def stop_workers(self, graceful: bool = False) -> None:
        """Stop every process this deployment started: SIGKILL (the next test flushes Redis), or
        with ``graceful`` a SIGTERM (Celery's warm shutdown, seconds) and SIGKILL for stragglers."""
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM if graceful else signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        self.procs.clear()
        self.workers.clear()


def _logged(proc: subprocess.Popen, text: str) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{proc.name} exited early ({proc.returncode}):\n{Deployment.log(proc)}")
    return text in Deployment.log(proc)


def _ready(proc: subprocess.Popen) -> bool:
    return _logged(proc, "ready.")


def deployment_env(redis_url: str, s3_endpoint: str, bucket: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh deployment: its own store prefix and spool directory."""
    return {
        **os.environ,
        "CHORUS_REDIS_URL": redis_url,
        "CHORUS_STORE": f"s3://{bucket}/dep-{uuid.uuid4().hex[:8]}",
        "CHORUS_S3_ENDPOINT_URL": s3_endpoint,
        "CHORUS_SPOOL_DIR": str(tmp_path / "spool"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        # infrastructure tests run in development mode; tests about identity sign their uploads
        "CHORUS_ALLOW_UNSIGNED": "true",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
