"""``chorus-mq redis-gateway`` (a real subprocess) in front of redis-server with the shipped config and users:
per-address and total connection limits that leave workers and other addresses their way in, idle connections
closed, and only the commands clients need forwarded (no XADD: appends go through the bounded function)."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from chorus_mq.gateway import GatewayLimits, Refused, check_login, login_users, source_of
from chorus_mq.state import EventLog, FederationKeys, Inbox

from .limits_support import closed, deployment, dial, first_line, resp
from .services import GatewayProcess

pytestmark = pytest.mark.services

K = FederationKeys("fed")
PER_SOURCE, TOTAL = 8, 20


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    with deployment(
        tmp_path_factory.mktemp("gateway"),
        "--per-source",
        str(PER_SOURCE),
        "--max-connections",
        str(TOTAL),
        "--idle-timeout",
        "600",
    ) as d:
        yield d


def _auth(d, sock, client: str = "alice") -> bytes:
    fed = "fed" if client == "alice" else "other"
    try:
        sock.sendall(resp("AUTH", f"client:{fed}:{client}", d.secrets[client]))
    except (ConnectionResetError, BrokenPipeError):
        return b""
    return first_line(sock)


def _hold(d, n: int, source: str) -> tuple[list, int]:
    """Open ``n`` connections from ``source``, each authenticated and parked in XREAD BLOCK 0; (held, refused)."""
    held, refused = [], 0
    for _ in range(n):
        sock = dial(d.gateway.port, source)
        line = _auth(d, sock)
        if line == b"+OK\r\n":
            sock.sendall(resp("XREAD", "BLOCK", "0", "STREAMS", K.events, "$"))
            held.append(sock)
        else:
            assert line in (b"", b"-ERR too many connections: the gateway allows 8 per address and 20 in all\r\n")
            refused += 1
            sock.close()
    return held, refused


def test_one_address_cannot_lock_out_workers_or_other_addresses(deployed):
    d = deployed
    held, refused = _hold(d, 500, "127.0.0.1")
    try:
        assert (len(held), refused) == (PER_SOURCE, 500 - PER_SOURCE)
        # a worker goes straight to Redis: it gets in, reads and writes
        worker = d.worker()
        assert worker.ping() and worker.hset("chorus:probe", "k", "v") == 1
        # another address still gets its connections, and the SDK works through them
        other, _ = _hold(d, 5, "127.0.0.2")
        held += other
        assert len(other) == 5
        sock = dial(d.gateway.port, "127.0.0.3")
        assert _auth(d, sock, "bob") == b"+OK\r\n"
        sock.sendall(resp("FCALL", "chorus_inbox_append", "1", FederationKeys("other").client_inbox("bob"), "{}"))
        assert first_line(sock).startswith(b"$")  # the new entry's id
        held.append(sock)
        # the total: 8 + 5 + 1 held; a fourth address gets the 6 left (below its own 8), then everyone is refused
        more, refused_more = _hold(d, 12, "127.0.0.4")
        held += more
        assert (len(more), refused_more) == (TOTAL - 14, 12 - (TOTAL - 14))
        assert _hold(d, 1, "127.0.0.5") == ([], 1)
        assert d.worker().ping()  # workers are never counted
    finally:
        for sock in held:
            sock.close()
    # closing them gives the address its connections back
    time.sleep(0.5)
    again, refused = _hold(d, PER_SOURCE, "127.0.0.1")
    for sock in again:
        sock.close()
    assert (len(again), refused) == (PER_SOURCE, 0)
    assert "refused a connection from 127.0.0.1" in d.gateway.log()


def test_idle_connections_are_closed(deployed, tmp_path):
    d = deployed
    gateway = GatewayProcess(tmp_path, d.redis.port, "--idle-timeout", "3").start()
    try:
        blocked = dial(gateway.port, "127.0.0.6")
        assert _auth(d, blocked) == b"+OK\r\n"
        blocked.sendall(resp("XREAD", "BLOCK", "0", "STREAMS", K.events, "$"))  # waits forever: silent both ways
        silent = dial(gateway.port, "127.0.0.6")
        start = time.monotonic()
        assert closed(blocked, timeout=15) and closed(silent, timeout=15)
        assert 2 < time.monotonic() - start < 12  # idle timeout 3 s (and a busy machine)
    finally:
        gateway.stop()


def test_the_sdk_works_through_the_gateway(deployed):
    d = deployed
    for protocol in (2, 3):  # AUTH, or HELLO 3 AUTH; CLIENT SETINFO and SETNAME
        alice = d.client("alice", protocol=protocol, client_name="alice")
        assert alice.ping()
        assert Inbox(alice, "fed", "alice").append('{"signed": "record"}')
        assert alice.hget(K.meta, "quorum") == "1"
        EventLog(d.worker(), "fed").emit("round_opened", 2)
        assert [e.type for e in EventLog(alice, "fed").read()][-1] == "round_opened"
        pubsub = alice.pubsub()
        pubsub.subscribe(K.channel)
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        pubsub.close()
        alice.close()
    inbox = Inbox(d.worker(), "fed", "alice")
    assert inbox.length() == 2
    inbox.redis.delete(inbox.key)


@pytest.mark.parametrize(
    "command",
    [
        resp("XADD", K.client_inbox("alice"), "*", "m", "{}"),
        resp("XADD", K.client_inbox("alice"), "MAXLEN", "0", "*", "m", "{}"),
        resp("XLEN", K.client_inbox("alice")),
        resp("SELECT", "7"),
        resp("FUNCTION", "FLUSH"),
        resp("EVAL", "return 1", "0"),
        resp("FCALL", "chorus_inbox_append", "1", K.client_inbox("alice"), "x" * (64 * 1024)),  # over the size
        b"*5\r\n$4\r\nXADD\r\n$4\r\nkey1\r\n$1\r\n*\r\n$1\r\nm\r\n$67108864\r\n",  # a 64 MB argument announced
        b"PING\r\n",  # inline
        b"*1\r\n$-1\r\n",
        b"*999999\r\n",
        b"+OK\r\n",
        resp("AUTH", "worker", "worker-dev-password"),  # a worker's password is useless from the client side
        resp("HELLO", "3", "AUTH", "operator", "operator-dev-password"),
        resp("HELLO", "3", "SETNAME", "AUTH", "AUTH", "worker", "worker-dev-password"),
        resp("AUTH", "worker-dev-password"),
    ],
    ids=[
        "xadd",
        "xadd-maxlen",
        "xlen",
        "select",
        "function-flush",
        "eval",
        "fcall-too-big",
        "64mb",
        "inline",
        "null",
        "many-args",
        "not-a-command",
        "auth-worker",
        "hello-operator",
        "hello-setname-auth",
        "auth-default",
    ],
)
def test_what_clients_may_not_send_closes_the_connection(deployed, command):
    d = deployed
    sock = dial(d.gateway.port, "127.0.0.7")
    assert _auth(d, sock) == b"+OK\r\n"
    try:
        sock.sendall(command)
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert closed(sock)
    sock.close()
    assert Inbox(d.worker(), "fed", "alice").length() == 0
    assert d.worker().ping()


def test_redis_refuses_what_the_gateway_forwards_beyond_a_clients_rights(deployed):
    d = deployed
    alice = d.client("alice")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        alice.fcall("chorus_inbox_append", 1, FederationKeys("other").client_inbox("bob"), "{}")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        alice.fcall("chorus_inbox_append", 1, K.client_inbox("bob"), "{}")
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        alice.xrange(K.client_inbox("alice"))
    assert alice.ping()  # refused by Redis, the connection stays


def test_logins_are_read_the_way_redis_reads_them():
    assert login_users("auth", [b"client:f:c", b"pw"]) == [b"client:f:c"]
    assert login_users("auth", [b"pw"]) == [b"default"]
    assert login_users("hello", [b"3"]) == []
    assert login_users("hello", [b"3", b"SETNAME", b"auth", b"auth", b"worker", b"pw"]) == [b"worker"]
    assert login_users("hello", [b"3", b"auth", b"client:f:c", b"pw", b"AUTH", b"worker", b"pw"]) == [
        b"client:f:c",
        b"worker",
    ]
    check_login("hello", [b"3", b"AUTH", b"client:f:c", b"pw", b"SETNAME", b"x"])
    with pytest.raises(Refused, match="only client users"):
        check_login("hello", [b"3", b"AUTH", b"client:f:c", b"pw", b"AUTH", b"operator", b"pw"])


def test_limits_and_sources():
    assert source_of("127.0.0.1") == "127.0.0.1" and source_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"  # one /64 is one source
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")
    with pytest.raises(ValueError):
        GatewayLimits(per_source=0)
