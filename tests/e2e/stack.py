"""The e2e suite's deployment: the compose stack's parts on loopback, wired the way docker-compose.yml wires them.

* a redis-server loaded with a copy of ``deploy/redis/users.acl`` (a copy, so ``ACL SAVE`` can write it),
  plus one test-only ``test-admin`` user for what a test does "as an admin" (planting wrong-typed keys,
  reading SLOWLOG);
* an S3 endpoint that enforces IAM policies (moto, ``tests/store/iamserver.py``): workers and operators
  hold the admin keys, every client gets its own least-privilege keys (``store.policy``);
* ``chorus-mq worker --role ingest``, ``chorus-mq worker --role aggregate`` and ``chorus-mq beat``
  subprocesses as the ``worker`` Redis user; operator commands as the ``operator`` user; each client with
  the URL ``chorus-mq client add`` printed for it.

A copy of what the e2e tests need from ``tests/topology.py`` (whose API is being reworked), kept small.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis as redis_lib

from chorus_mq.client import ChorusClient
from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.settings import Settings
from chorus_mq.store import S3Credentials, open_store, split_s3_url
from chorus_mq.store.policy import provision_iam_client

from ..services import CLI, REDIS_CONF, RedisServer, run_cli, spawn_logged, wait_for
from ..store.iamserver import AuthS3

ROOT = Path(__file__).resolve().parents[2]
ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
#: a user only the tests have (never in deploy/): what an attacker who owns the store or Redis could do
ADMIN_USER, ADMIN_PASSWORD = "test-admin", "test-admin-password"


def acl_passwords(path: Path = ACL_FILE) -> dict[str, str]:
    """User -> password of the shipped ACL file (``user NAME on >PASSWORD ...``)."""
    out = {}
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "user":
            secret = next((w[1:] for w in words[2:] if w.startswith(">")), None)
            if secret is not None:
                out[words[1]] = secret
    return out


def start_acl_redis(workdir: Path, *args: str) -> RedisServer:
    """A redis-server with the shipped redis.conf and a writable copy of users.acl (and the test-only admin),
    logged in as the operator."""
    workdir.mkdir(parents=True, exist_ok=True)
    acl = workdir / "users.acl"
    shutil.copy(ACL_FILE, acl)
    with acl.open("a") as f:
        f.write(f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all\n")
    return RedisServer(
        workdir / "data",
        args=("--aclfile", str(acl), *args),
        username="operator",
        password=acl_passwords()["operator"],
        config=REDIS_CONF,  # the shipped limits: every worker write must fit them
    ).start()


@dataclass(frozen=True)
class ClientCreds:
    """What a client is handed: its secret and Redis URL (``client add``), and its own S3 keys."""

    federation: str
    client: str
    secret: str
    redis_url: str
    s3: S3Credentials


class Stack:
    """One deployment: the services above, the processes it started, and handles for each role."""

    def __init__(self, redis: RedisServer, s3: AuthS3, workdir: Path, **settings: str):
        self.redis_server = redis
        self.s3 = s3
        self.workdir = workdir
        passwords = acl_passwords()
        self.worker_url = redis.url_for("worker", passwords["worker"])
        self.operator_url = redis.url_for("operator", passwords["operator"])
        self.store_url = f"s3://{s3.bucket}/e2e-{uuid.uuid4().hex[:8]}"
        self.bucket, self.prefix = split_s3_url(self.store_url)
        self.env = {
            **os.environ,
            "CHORUS_REDIS_URL": self.worker_url,
            "CHORUS_STORE": self.store_url,
            "CHORUS_S3_ENDPOINT_URL": s3.url,
            "CHORUS_SPOOL_DIR": str(workdir / "spool"),
            "CHORUS_ALLOW_UNSIGNED": "false",  # production mode: every client signs
            "CHORUS_CLIENT_ACL": "on",  # `client add` must create the client's Redis user
            "CHORUS_SWEEP_INTERVAL": "0.5",
            **s3.admin.env(),
            "AWS_EC2_METADATA_DISABLED": "true",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **settings,
        }
        self.procs: list[subprocess.Popen] = []

    # -- handles ---------------------------------------------------------------------------

    def settings(self, redis_url: str, **overrides: Any) -> Settings:
        return Settings(
            redis_url=redis_url,
            store=self.store_url,
            s3_endpoint_url=self.s3.url,
            spool_dir=str(self.workdir / "spool"),
            **overrides,
        )

    def operator(self) -> ChorusClient:
        """The operator's SDK (the ``operator`` Redis user, the store's admin keys)."""
        settings = self.settings(self.operator_url, client_acl="on")
        return ChorusClient(settings, store=open_store(self.store_url, settings, credentials=self.s3.admin))

    def admin_redis(self) -> redis_lib.Redis:
        return redis_lib.Redis(
            port=self.redis_server.port, username=ADMIN_USER, password=ADMIN_PASSWORD, decode_responses=True
        )

    def admin_store(self):
        return open_store(self.store_url, self.settings(self.operator_url), credentials=self.s3.admin)

    def client(self, creds: ClientCreds) -> ChorusClient:
        """A client's SDK: its own Redis user (the URL carries its secret) and its own S3 keys."""
        settings = self.settings(creds.redis_url)
        return ChorusClient(settings, store=open_store(self.store_url, settings, credentials=creds.s3))

    def client_redis(self, creds: ClientCreds) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(creds.redis_url, decode_responses=True)

    def client_s3(self, creds: ClientCreds) -> Any:
        """Plain boto3 under the client's keys, as a hostile client would use them."""
        return self.s3.client("s3", creds.s3)

    # -- the CLI ---------------------------------------------------------------------------

    def cli(
        self,
        *args: str,
        as_: str | ClientCreds = "operator",
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """``chorus-mq ARGS`` as ``operator``, ``worker`` or a client (its URL and S3 keys, nothing else)."""
        if isinstance(as_, ClientCreds):
            role = {"CHORUS_REDIS_URL": as_.redis_url, **as_.s3.env()}
        else:
            role = {"CHORUS_REDIS_URL": {"operator": self.operator_url, "worker": self.worker_url}[as_]}
        return run_cli(args, {**self.env, **role, **(env or {})}, ROOT, timeout=timeout, check=check)

    def add_client(self, federation: str, client: str, *options: str) -> ClientCreds:
        """``chorus-mq client add`` (operator), then the client's least-privilege S3 keys (IAM)."""
        out = self.cli("client", "add", client, "--federation", federation, *options).stdout
        printed = dict(line.strip().split("=", 1) for line in out.splitlines() if line.strip().startswith("CHORUS_"))
        keys = provision_iam_client(self.s3.client("iam"), self.bucket, self.prefix, federation, client)
        return ClientCreds(federation, client, printed["CHORUS_CLIENT_SECRET"], printed["CHORUS_REDIS_URL"], keys)

    # -- processes -------------------------------------------------------------------------

    def spawn(self, kind: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``chorus-mq ARGS`` in its own process group, logging to ``<kind>-<id>.log``."""
        log_path = self.workdir / f"{kind}-{uuid.uuid4().hex[:6]}.log"
        proc = spawn_logged(log_path, ["-m", CLI, *args], {**self.env, **(env or {})}, ROOT)
        self.procs.append(proc)
        return proc

    def start_worker(self, role: str, *, concurrency: int = 1, wait: bool = True) -> subprocess.Popen:
        proc = self.spawn(
            f"worker-{role}",
            "worker",
            "--role",
            role,
            "--concurrency",
            str(concurrency),
            "-l",
            "INFO",
            "--hostname",
            f"{role}-{uuid.uuid4().hex[:6]}@%h",
        )
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, *procs: subprocess.Popen) -> None:
        for proc in procs:
            wait_for(lambda proc=proc: _ready(proc), 120, f"{proc.name} to be ready")

    def start_beat(self) -> subprocess.Popen:
        return self.spawn("beat", "beat", "-l", "INFO")

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    def stop(self) -> None:
        """SIGKILL every process group this stack started (nothing outlives the tests)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)
        self.procs.clear()


def _ready(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{proc.name} exited early ({proc.returncode}):\n{Stack.log(proc)}")  # type: ignore[attr-defined]
    return "ready." in Stack.log(proc)


@contextlib.contextmanager
def running_stack(
    redis: RedisServer, s3: AuthS3, workdir: Path, *, workers: bool = True, beat: bool = True, **settings: str
) -> Iterator[Stack]:
    """A Stack with an ingest worker, an aggregate worker and a beat (as the compose file runs them)."""
    stack = Stack(redis, s3, workdir, **settings)
    try:
        if workers:
            procs = [stack.start_worker(role, wait=False) for role in ("ingest", "aggregate")]
            stack.wait_ready(*procs)
        if beat:
            stack.start_beat()
        yield stack
    finally:
        stack.stop()


# -- what a hostile client can do with its own credentials ------------------------------------


def put_raw(sdk: ChorusClient, federation: str, client: str, data: bytes, *, sha256: str | None = None) -> str:
    """Store ``data`` under the client's own prefix (its S3 keys allow that much) as the object for ``sha256``."""
    import hashlib

    sha = sha256 or hashlib.sha256(data).hexdigest()
    sdk.store.put_bytes(delta_key(federation, client, sha), data, write_once=False)
    return sha


def submit_raw(
    sdk: ChorusClient,
    federation: str,
    client: str,
    data: bytes,
    *,
    claimed_sha: str | None = None,
    round_: int | None = None,
    dataset_size: float | None = None,
    timeout: float = 60,
):
    """Upload bytes the SDK's local validation never saw: store them, then append a signed record (the SDK
    signs with the secret in the client's URL) and wait for the worker's verdict."""
    sha = put_raw(sdk, federation, client, data, sha256=claimed_sha)
    msg = IngestMessage(
        federation=federation, round=round_, client_id=client, sha256=sha, size=len(data), dataset_size=dataset_size
    )
    return sdk.submit(msg, timeout=timeout)


def events(sdk: ChorusClient, federation: str) -> list[dict[str, Any]]:
    """Every event of the federation so far (as published)."""
    from chorus_mq.state import EventLog

    return [e.to_dict() for e in EventLog(sdk.redis, federation).read("0-0", count=100_000)]


def manifest_of(sdk: ChorusClient, federation: str, round_: int) -> dict[str, Any]:
    """Round ``round_``'s manifest as stored (checked against the hash Redis recorded at commit)."""
    from chorus_mq.results import fetch_manifest

    manifest, _ = fetch_manifest(sdk.state, sdk.store, federation, round_)
    return json.loads(manifest.to_json())
