"""What a hostile client does to another federation's verdicts, live: the attack rows of hostile_ingest.py.

Run: python benchmarks/hostile_ingest.py --attacks [--uploads 3]   (or this file directly)

The deployment is the e2e suite's (tests/e2e/stack.py): redis-server with the shipped redis.conf and
users.acl, an S3 that enforces IAM policies (moto), ``chorus-mq worker --role ingest``, ``worker --role
aggregate`` and ``beat`` with default settings. The attacker holds only what ``client add`` and
``client s3-policy`` gave it, and talks to Redis directly (as if Redis were exposed without the gateway:
the worst case; the gateway refuses raw XADD altogether). Honest client: another federation, uploading
through the SDK. Each row measures, in the same minute, the honest verdict latency before the attack
(the median of ``--uploads``) and while it runs, their ratio (target: at most 2x, and 10 s at most on a
loaded machine), Redis's peak ``used_memory`` above its level before the attack (sampled at 20 Hz; the
documented bound is 16 MB per client), and the longest the ingest queue got.

Rows (issue 15): junk bytes several times a second (finding 2); 8 records of 64 MB and a database other
than 0 (finding 4); one large object and 30 signed records pointing at one object (finding 5); a burst of
60,000 ten-byte records (finding 6).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # chorus_mq and the tests' stack from a checkout

import redis as redis_lib

from chorus_mq.messages import IngestMessage
from chorus_mq.names import Queue
from chorus_mq.state import FederationKeys
from tests.deltas import random_factors, write_adapter
from tests.e2e.stack import ClientCreds, Stack, put_raw, running_stack, start_acl_redis
from tests.e2e.test_trust_e2e import make_fed
from tests.store.iamserver import enforcing_moto


def inbox_key(federation: str, client: str) -> str:
    """A client's inbox key, as its XADDs name it."""
    return FederationKeys(federation).client_inbox(client)


class Sampler:
    """Redis's used_memory and the ingest queue's length, sampled at 20 Hz while an attack runs."""

    def __init__(self, admin: redis_lib.Redis):
        self.admin = admin
        self.base = int(admin.info("memory")["used_memory"])
        self.peak = self.base
        self.queue = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis_lib.RedisError):
                self.peak = max(self.peak, int(self.admin.info("memory")["used_memory"]))
                self.queue = max(self.queue, int(self.admin.llen(Queue.INGEST.value)))
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Honest:
    """The honest federation, whose round never fills: each upload is a new client's (one delta per client
    and round), timed from the SDK call to its verdict."""

    def __init__(self, stack: Stack, tmp: Path, federation: str):
        self.stack, self.tmp, self.federation = stack, tmp, federation
        self.n = 0

    def one(self) -> float:
        self.n += 1
        creds = self.stack.add_client(self.federation, f"h{self.n}")  # not timed
        path = write_adapter(self.tmp / f"honest-{self.n}.safetensors", random_factors(self.n))
        started = time.monotonic()
        result = self.stack.client(creds).upload(creds.federation, path, creds.client, dataset_size=100.0, timeout=120)
        assert result.status in ("accepted", "fired"), result
        return time.monotonic() - started

    def median(self, k: int) -> float:
        return statistics.median(self.one() for _ in range(k))


@contextlib.contextmanager
def running(attack: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``attack(stop)`` in a thread for the duration of the block."""
    stop = threading.Event()
    thread = threading.Thread(target=attack, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the attack is under way before the honest client starts
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def junk_bytes(r: redis_lib.Redis, key: str) -> Callable[[threading.Event], None]:
    """Finding 2: records that are not UTF-8, several a second."""

    def attack(stop: threading.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(redis_lib.RedisError):
                r.xadd(key, {"m": b"\xff"})
                r.xadd(key, {b"\xfe": b"\xc3\x28"})
            stop.wait(0.2)

    return attack


def big_records(r: redis_lib.Redis, key: str, refused: list[str]) -> Callable[[threading.Event], None]:
    """Finding 4: 8 records of 64 MB (Redis's limit on one argument refuses each), then ``SELECT 7``."""
    blob = b"x" * (64 * 2**20)

    def attack(stop: threading.Event) -> None:
        for _ in range(8):
            try:
                r.xadd(key, {"m": blob})
            except redis_lib.RedisError as exc:
                refused.append(type(exc).__name__)
        try:
            r.execute_command("SELECT", 7)
        except redis_lib.RedisError as exc:
            refused.append(f"SELECT: {type(exc).__name__}")
        stop.wait()

    return attack


def amplification(stack: Stack, creds: ClientCreds, tmp: Path) -> Callable[[threading.Event], None]:
    """Finding 5: a 100 MB object and 30 signed records for one valid object (one download, 29 duplicates)."""
    sdk = stack.client(creds)
    big = b"\0" * (100 * 2**20)
    big_sha = put_raw(sdk, creds.federation, creds.client, big)
    valid = write_adapter(tmp / "valid.safetensors", random_factors(999)).read_bytes()
    sha = put_raw(sdk, creds.federation, creds.client, valid)
    inbox = redis_lib.Redis.from_url(creds.redis_url)

    def record(sha256: str, size: int) -> str:
        msg = IngestMessage(
            federation=creds.federation, client_id=creds.client, sha256=sha256, size=size, dataset_size=100.0
        )
        return msg.signed(creds.secret).model_dump_json()

    def attack(stop: threading.Event) -> None:
        with contextlib.suppress(redis_lib.RedisError):
            inbox.xadd(inbox_key(creds.federation, creds.client), {"m": record(big_sha, len(big))})
            for _ in range(30):
                inbox.xadd(inbox_key(creds.federation, creds.client), {"m": record(sha, len(valid))})
        stop.wait()

    return attack


def flood(r: redis_lib.Redis, key: str) -> Callable[[threading.Event], None]:
    """Finding 6: 60,000 ten-byte records as fast as a pipeline sends them."""

    def attack(stop: threading.Event) -> None:
        for _ in range(60):
            if stop.is_set():
                return
            with contextlib.suppress(redis_lib.RedisError), r.pipeline(transaction=False) as pipe:
                for _ in range(1000):
                    pipe.xadd(key, {"m": b"0123456789"})
                pipe.execute()
        stop.wait()

    return attack


def fetches(stack: Stack, client: str) -> int:
    """Objects of ``client`` the ingest workers downloaded so far (their log names each)."""
    mark = f"/deltas/{client}/"
    logs = (stack.log(p) for p in stack.procs if p.name.startswith("worker-ingest"))
    return sum(1 for log in logs for line in log.splitlines() if " fetched " in line and mark in line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=3, help="honest uploads timed per phase (the median)")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="chorus-attacks-") as tmp_name, enforcing_moto() as s3:
        tmp = Path(tmp_name)
        server = start_acl_redis(tmp / "redis")
        (tmp / "stack").mkdir()
        try:
            with running_stack(server, s3, tmp / "stack") as stack:
                run_rows(stack, tmp, args.uploads)
        finally:
            server.stop()


def run_rows(stack: Stack, tmp: Path, k: int) -> None:
    honest = Honest(stack, tmp, make_fed(stack, "honest", quorum=1000))  # never fires: each upload is one verdict
    attackers = make_fed(stack, "attackers", quorum=1000)
    admin = stack.admin_redis()
    print(f"honest verdict latency in another federation, median of {k} uploads; default settings")
    print(f"{'attack':<44} {'before s':>8} {'during s':>8} {'ratio':>6} {'Redis +MB':>9} {'queue':>6}  notes")
    honest.median(1)  # warm-up: connections, the first round

    def junk(creds: ClientCreds):
        r = redis_lib.Redis.from_url(creds.redis_url)
        return junk_bytes(r, inbox_key(attackers, creds.client)), lambda: ""

    def big(creds: ClientCreds):
        refused: list[str] = []
        r = redis_lib.Redis.from_url(creds.redis_url, socket_timeout=60)
        return big_records(
            r, inbox_key(attackers, creds.client), refused
        ), lambda: f"refused: {len(refused)} ({', '.join(sorted(set(refused)))})"

    def amp(creds: ClientCreds):
        return amplification(stack, creds, tmp), lambda: f"attacker's downloads: {fetches(stack, creds.client)} for 31"

    def junk_flood(creds: ClientCreds):
        r = redis_lib.Redis.from_url(creds.redis_url)
        return flood(r, inbox_key(attackers, creds.client)), lambda: ""

    rows = [
        ("2: non-UTF-8 records, 10 a second", junk),
        ("4: 8 x 64 MB records, SELECT 7", big),
        ("5: 100 MB object + 30 records for one object", amp),
        ("6: 60,000 ten-byte records", junk_flood),
    ]
    for i, (name, make) in enumerate(rows):
        attacker = stack.add_client(attackers, f"mallory{i}")
        before = honest.median(k)
        attack, notes = make(attacker)
        with Sampler(admin) as sampler, running(attack):
            during = honest.median(k)
        print(
            f"{name:<44} {before:>8.2f} {during:>8.2f} {during / before:>6.2f} "
            f"{(sampler.peak - sampler.base) / 2**20:>9.1f} {sampler.queue:>6}  {notes()}",
            flush=True,
        )
        _drain(admin, attackers, attacker.client)


def _drain(admin: redis_lib.Redis, federation: str, client: str, timeout: float = 180) -> None:
    """Wait until the attacker's inbox is judged and empty, so the next row starts clean."""
    key = inbox_key(federation, client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and admin.xlen(key):
        time.sleep(0.5)


if __name__ == "__main__":
    main()
