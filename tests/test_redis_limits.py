"""What one client can make Redis hold (issue 15, finding 4), over redis-server started with the shipped
deploy/redis/redis.conf and users.acl, the append function loaded as workers load it, and the gateway in front:
whatever a client writes, in any database, Redis's memory grows by at most the documented 16 MB, and another
federation's client and the workers can still write under maxmemory."""

from __future__ import annotations

import re
import threading
import time

import pytest
import redis as redis_lib

from chorus_mq.errors import ServiceUnavailable, TooLarge
from chorus_mq.state import EventLog, FederationKeys, Inbox
from chorus_mq.state.functions import DEFAULT_MAX_RECORD_BYTES, DEFAULT_MAX_RECORDS

from .limits_support import closed, deployment, dial, first_line, resp
from .services import REDIS_CONF

pytestmark = pytest.mark.services

MB = 1024 * 1024
#: the documented figure (deploy/redis/README.md): what one client can make Redis hold, whatever it writes
CLIENT_BOUND = 16 * MB
#: of which stored: its inbox, full (64 records of 16 KiB: 1 MiB, and the allocator's and stream's overhead)
INBOX_BOUND = 3 * MB // 2
PER_SOURCE = 8
K = FederationKeys("fed")


@pytest.fixture
def deployed(tmp_path):
    with deployment(tmp_path, "--per-source", str(PER_SOURCE), redis_args=("--maxmemory", "64mb")) as d:
        yield d


def _config() -> dict[str, str]:
    out = {}
    for line in REDIS_CONF.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out[name + (" " + value.split()[0] if name == "client-output-buffer-limit" else "")] = value
    return out


def test_the_shipped_config_sets_the_limits():
    conf = _config()
    assert conf["proto-max-bulk-len"] == "1mb" and conf["client-query-buffer-limit"] == "1mb"  # Redis's minimum
    assert conf["maxmemory-policy"] == "noeviction" and conf["appendonly"] == "yes"
    assert conf["client-output-buffer-limit normal"].split()[1:] == ["16mb", "4mb", "30"]
    assert conf["client-output-buffer-limit pubsub"].split()[1:] == ["1mb", "256kb", "60"]
    assert int(conf["maxclients"]) > 1000 + 1000  # the gateway's default total, plus room for the workers
    assert "dir" not in conf and "aclfile" not in conf  # given on the command line (compose)


def _announce_64mb(port: int, secret: str) -> bool:
    """AUTH as alice, announce a 64 MB XADD argument and send what fits; whether the peer closed the connection."""
    sock = dial(port)
    sock.sendall(resp("AUTH", "client:fed:alice", secret))
    assert first_line(sock) == b"+OK\r\n"
    head = b"*5\r\n$4\r\nXADD\r\n" + f"${len(K.client_inbox('alice'))}\r\n{K.client_inbox('alice')}\r\n".encode()
    sock.sendall(head + b"$1\r\n*\r\n$1\r\nm\r\n$67108864\r\n")
    try:
        for _ in range(64):
            sock.sendall(b"x" * MB)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        pass
    try:
        return closed(sock)
    finally:
        sock.close()


def _fill_input_buffers(d, peak: list[int]) -> int:
    """The most connections the gateway gives one address, each parked in XREAD BLOCK 0 with 2 MB of commands
    queued behind it (Redis reads a blocked client's input but runs none of it). Returns how many Redis closed."""
    socks = []
    for _ in range(PER_SOURCE):
        sock = dial(d.gateway.port)
        sock.sendall(resp("AUTH", "client:fed:alice", d.secrets["alice"]))
        assert first_line(sock) == b"+OK\r\n"
        sock.sendall(resp("XREAD", "BLOCK", "0", "STREAMS", K.events, "$"))
        socks.append(sock)
    junk = resp("GET", K.meta + "x" * 16_000)

    def flood(sock) -> None:
        try:
            for _ in range(2 * MB // len(junk)):
                sock.sendall(junk)
        except (OSError, TimeoutError):
            pass

    threads = [threading.Thread(target=flood, args=(sock,)) for sock in socks]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak[0] = max(peak[0], d.used_memory())
        threads[0].join(0.05)
    shut = sum(closed(sock, timeout=10) for sock in socks)
    for sock in socks:
        sock.close()
    return shut


def test_one_client_cannot_make_redis_hold_more_than_the_documented_bound(deployed, capsys):
    d = deployed
    worker = d.worker()
    base = d.used_memory()
    peak = [base]
    alice = d.client("alice")
    inbox = Inbox(alice, "fed", "alice")

    # records as large as allowed, far more of them than the inbox holds (nobody is reading it)
    record = "r" * DEFAULT_MAX_RECORD_BYTES
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(1000):
        try:
            inbox.append(record)
            outcomes["accepted"] += 1
        except ServiceUnavailable as exc:
            assert "holds 64 records" in str(exc)
            outcomes["refused"] += 1
    assert outcomes == {"accepted": DEFAULT_MAX_RECORDS, "refused": 1000 - DEFAULT_MAX_RECORDS}
    with pytest.raises(TooLarge, match=f"{DEFAULT_MAX_RECORD_BYTES + 1} bytes"):
        inbox.append(record + "r")
    peak[0] = max(peak[0], d.used_memory())
    alice.close()  # give the address its gateway connections back for what follows

    # a 64 MB XADD: the gateway closes the connection at the announcement; Redis itself (were it exposed) refuses
    # any argument over proto-max-bulk-len
    assert _announce_64mb(d.gateway.port, d.secrets["alice"])
    assert _announce_64mb(d.redis.port, d.secrets["alice"])
    peak[0] = max(peak[0], d.used_memory())

    # another database: no SELECT, so nothing can be written where the pump never looks
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        d.client("alice", direct=True).execute_command("SELECT", 7)
    with pytest.raises(redis_lib.RedisError):
        d.client("alice", direct=True, db=7).ping()  # redis-py's SELECT on connect is refused
    seven = redis_lib.Redis(port=d.redis.port, username="worker", password="worker-dev-password", db=7)
    assert seven.dbsize() == 0

    # input buffers: every connection one address may hold, each stuffed while blocked
    time.sleep(0.5)  # the gateway counts a closed connection out once it has seen it close
    assert _fill_input_buffers(d, peak) == PER_SOURCE  # Redis closed each at client-query-buffer-limit (1 MB)
    after = d.used_memory()
    held = Inbox(worker, "fed", "alice")
    stored = int(worker.memory_usage(held.key) or 0)
    with capsys.disabled():
        print(
            f"\nredis used_memory: baseline {base / MB:.2f} MB, peak {peak[0] / MB:.2f} MB "
            f"(+{(peak[0] - base) / MB:.2f}), after {after / MB:.2f} MB (+{(after - base) / MB:.2f}); "
            f"alice's inbox {stored / MB:.2f} MB in {held.length()} records"
        )
    assert held.length() == DEFAULT_MAX_RECORDS and stored <= INBOX_BOUND
    assert peak[0] - base <= CLIENT_BOUND and after - base <= CLIENT_BOUND

    # under maxmemory (64 MB here): another federation's client appends, the workers write
    assert Inbox(d.client("bob"), "other", "bob").append("{}")
    assert worker.hset(K.meta, "probe", "1") == 1
    assert EventLog(worker, "fed").emit("round_opened", 2)
    assert re.fullmatch(r"\d+-\d+", Inbox(worker, "fed", "carol").append("{}"))  # the worker's rights
