"""A real deployment on loopback: private redis-server, moto S3, chorus-mq worker subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis


class Deployment:
    def __init__(self, env: dict[str, str], workdir: Path, redis_url: str):
        self.env = env
        self.workdir = workdir
        self.redis_url = redis_url
        self.workers: list[subprocess.Popen] = []

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "chorus_mq.cli", *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"chorus-mq {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def popen_cli(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "chorus_mq.cli", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def start_worker(self, *extra: str, env: dict[str, str] | None = None, concurrency: int = 1) -> subprocess.Popen:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "chorus_mq.cli", "worker", "--concurrency", str(concurrency), "-l", "INFO",
             "--hostname", f"{name}@%h", *extra],
            env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        proc.log_path = self.workdir / f"{name}.log"
        self.workers.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "ready." in proc.log_path.read_text():
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{proc.log_path.read_text()}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready:\n{proc.log_path.read_text()}")

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        self.workers.clear()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)


@pytest.fixture
def deployment(redis_server, s3_endpoint, s3_bucket, tmp_path):
    """A clean deployment: Redis flushed, a fresh store prefix, no workers yet."""
    redis_server.client().flushall()
    env = {
        **os.environ,
        "CHORUS_REDIS_URL": redis_server.url,
        "CHORUS_STORE": f"s3://{s3_bucket}/e2e-{uuid.uuid4().hex[:8]}",
        "CHORUS_S3_ENDPOINT_URL": s3_endpoint,
        "CHORUS_SPOOL_DIR": str(tmp_path / "spool"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    dep = Deployment(env, tmp_path, redis_server.url)
    yield dep
    dep.stop_workers()
