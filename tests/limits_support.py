"""A client-facing deployment for the limit tests: Redis with the shipped config and users, the append function
loaded (as a worker does), federations ``fed`` (client alice) and ``other`` (client bob), and the gateway."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib

from chorus_mq.state import Acl, ClientRegistry, client_username
from chorus_mq.state.functions import InboxLimits, load_functions

from .services import GatewayProcess, RedisServer, start_shipped_redis
from .state.support import make_state

WORKER_PASSWORD = "worker-dev-password"


@dataclass
class Deployment:
    redis: RedisServer
    gateway: GatewayProcess
    secrets: dict[str, str]  # client -> secret (alice of fed, bob of other)

    def worker(self) -> redis_lib.Redis:
        """A worker's own connection, straight to Redis."""
        return redis_lib.Redis(port=self.redis.port, username="worker", password=WORKER_PASSWORD, decode_responses=True)

    def client(self, name: str, *, direct: bool = False, **kw) -> redis_lib.Redis:
        """``name``'s redis-py connection through the gateway (or, with ``direct``, as if Redis were exposed)."""
        fed = "fed" if name == "alice" else "other"
        port = self.redis.port if direct else self.gateway.port
        return redis_lib.Redis(
            port=port, username=client_username(fed, name), password=self.secrets[name], decode_responses=True, **kw
        )

    def used_memory(self) -> int:
        return int(self.worker().info("memory")["used_memory"])


@contextlib.contextmanager
def deployment(workdir: Path, *gateway_options: str, redis_args: tuple[str, ...] = ()) -> Iterator[Deployment]:
    server = start_shipped_redis(workdir / "redis", *redis_args)
    gateway = None
    try:
        op = server.client()
        secrets = {}
        for fed, client in (("fed", "alice"), ("other", "bob")):
            make_state(op, name=fed, quorum=1)
            secrets[client] = ClientRegistry(op, fed).add(client)
            Acl(op).grant(fed, client, secrets[client])
        worker = redis_lib.Redis(port=server.port, username="worker", password=WORKER_PASSWORD)
        load_functions(worker, InboxLimits())  # what `chorus-mq worker` does at startup
        gateway = GatewayProcess(workdir / "gateway", server.port, *gateway_options).start()
        yield Deployment(server, gateway, secrets)
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


def resp(*args: str | bytes) -> bytes:
    """One command in RESP (what redis-py sends)."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    return b"".join(out)


def dial(port: int, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
    """A raw TCP connection from loopback address ``source`` (all of 127.0.0.0/8 is this machine)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def first_line(sock: socket.socket) -> bytes:
    """The first reply line, or b"" when the peer closed the connection (reset included)."""
    data = b""
    try:
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(1)
            if not chunk:
                return data
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data
    return data


def closed(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the peer closes ``sock`` within ``timeout`` (whatever it sends first is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True
