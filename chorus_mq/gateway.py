"""``chorus-mq redis-gateway``: the only way clients reach Redis.

Redis has no per-user connection limit, and it cannot restrict a command's arguments. The gateway sits
in front of Redis for clients (workers connect to Redis directly, so they always get in) and:

* limits connections per source address (an IPv4 address, or an IPv6 /64) and in total, and closes
  connections idle in both directions for longer than the idle timeout;
* reads each command's RESP framing (an array of bulk strings; inline commands are refused) without
  interpreting its arguments, refuses any command longer than ``max_command_bytes`` or whose name is not
  one a client needs (:data:`chorus_mq.state.acl.GATEWAY_COMMANDS`: no XADD, so appends go through the
  bounded ``chorus_inbox_append`` function), and forwards the command's bytes verbatim;
* lets only client users log in (``AUTH``/``HELLO ... AUTH`` naming ``client:...``), so the workers' and
  the operator's passwords are useless from the client side;
* forwards replies verbatim, closing a connection whose reader has not taken them within
  ``slow_reader_s`` (Redis's output-buffer limit bounds what waits meanwhile).

A refused command closes the connection at once (the SDK never sends one); Redis's ACL does the rest of
the checking.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from .state.acl import GATEWAY_COMMANDS
from .state.redis_keys import CLIENT_USER_PREFIX

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024
#: the longest RESP header line (``*N`` or ``$N``) accepted
_HEADER_LIMIT = 32


@dataclass(frozen=True)
class GatewayLimits:
    """Per-source and total connections, idle and slow-reader timeouts, the largest command forwarded."""

    per_source: int = 8
    total: int = 1000
    idle_timeout_s: float = 300.0
    slow_reader_s: float = 30.0
    max_command_bytes: int = 64 * 1024
    max_arguments: int = 64

    def __post_init__(self) -> None:
        if min(self.per_source, self.total, self.max_command_bytes, self.max_arguments) < 1:
            raise ValueError(f"gateway limits must be positive: {self}")
        if self.idle_timeout_s <= 0 or self.slow_reader_s <= 0:
            raise ValueError(f"gateway timeouts must be positive: {self}")


class Refused(Exception):
    """A command the gateway does not forward; the connection is closed."""


def source_of(host: str) -> str:
    """The address a connection is counted against: the IPv4 address, or the IPv6 /64 it is in."""
    address = ipaddress.ip_address(host.split("%", maxsplit=1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


async def _header(reader: asyncio.StreamReader, kind: bytes) -> int:
    line = await reader.readuntil(b"\r\n")
    if len(line) > _HEADER_LIMIT or not line.startswith(kind):
        raise Refused("not a RESP array of bulk strings (inline commands are not accepted)")
    try:
        return int(line[1:-2])
    except ValueError:
        raise Refused(f"malformed RESP header {line[:_HEADER_LIMIT]!r}") from None


async def read_command(reader: asyncio.StreamReader, limits: GatewayLimits) -> tuple[str, list[bytes], bytes]:
    """One command's name (lower case), its arguments and its exact bytes; :class:`Refused` beyond the limits.

    Raises ``asyncio.IncompleteReadError`` when the client closes the connection.
    """
    count = await _header(reader, b"*")
    if not 1 <= count <= limits.max_arguments:
        raise Refused(f"a command of {count} arguments (at most {limits.max_arguments})")
    parts = [f"*{count}\r\n".encode()]
    size = len(parts[0])
    name = ""
    args: list[bytes] = []
    for i in range(count):
        length = await _header(reader, b"$")
        size += len(str(length)) + 3 + length + 2
        if length < 0 or size > limits.max_command_bytes:
            raise Refused(f"a command of more than {limits.max_command_bytes} bytes")
        body = await reader.readexactly(length + 2)
        if body[-2:] != b"\r\n":
            raise Refused("malformed RESP bulk string")
        if i == 0:
            name = body[:-2].decode("ascii", "replace").lower()
        else:
            args.append(body[:-2])
        parts += [f"${length}\r\n".encode(), body]
    return name, args, b"".join(parts)


def login_users(name: str, args: list[bytes]) -> list[bytes]:
    """The users an ``AUTH`` or ``HELLO`` logs in as (``b"default"`` for a password alone), read the way Redis
    reads them: HELLO's options in order, AUTH taking two words and SETNAME one."""
    if name == "auth":
        return [args[0] if len(args) == 2 else b"default"]
    users = []
    if name == "hello":
        i = 1
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args) + 1:
                users.append(args[i + 1] if i + 1 < len(args) else b"")
                i += 3
            elif option == b"SETNAME":
                i += 2
            else:
                i += 1  # Redis refuses the command; nothing logs in
    return users


def check_login(name: str, args: list[bytes]) -> None:
    """Only client users log in through the gateway: a worker's or the operator's password (a leaked or
    shipped one) is useless from here."""
    for user in login_users(name, args):
        if not user.startswith(CLIENT_USER_PREFIX.encode() + b":"):
            raise Refused(f"only client users log in through the gateway, not {user[:64]!r}")


class Gateway:
    """Accepts client connections on ``listen`` and relays each to its own connection to Redis at ``upstream``."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        limits: GatewayLimits | None = None,
        commands: Collection[str] = GATEWAY_COMMANDS,
    ):
        self.listen = listen
        self.upstream = upstream
        self.limits = limits or GatewayLimits()
        self.commands = frozenset(commands)
        self.by_source: Counter[str] = Counter()
        self.refused = 0
        self._server: asyncio.Server | None = None

    @property
    def total(self) -> int:
        return sum(self.by_source.values())

    async def start(self) -> asyncio.Server:
        self._server = await asyncio.start_server(self._handle, *self.listen, limit=_READ_CHUNK)
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        server = self._server or await self.start()
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = source_of(peer[0]) if peer else "unknown"
        if self.by_source[source] >= self.limits.per_source or self.total >= self.limits.total:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, 8th...: a flood must not flood the log
                log.warning(
                    "refused a connection from %s: %d open from it, %d in all (%d refused so far)",
                    source,
                    self.by_source[source],
                    self.total,
                    self.refused,
                )
            writer.write(
                b"-ERR too many connections: the gateway allows "
                + f"{self.limits.per_source} per address and {self.limits.total} in all\r\n".encode()
            )
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.drain(), 1)
            writer.close()
            return
        self.by_source[source] += 1
        try:
            await self._relay(reader, writer, source)
        finally:
            self.by_source[source] -= 1
            if self.by_source[source] <= 0:
                del self.by_source[source]
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            log.error("cannot reach Redis at %s:%d: %s", *self.upstream, exc)
            writer.write(b"-ERR the gateway cannot reach Redis\r\n")
            return
        last = [time.monotonic()]
        tasks = [
            asyncio.ensure_future(self._commands(reader, up_writer, source, last)),
            asyncio.ensure_future(self._replies(up_reader, writer, last)),
            asyncio.ensure_future(self._idle(last)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()

    async def _commands(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, source: str, last: list[float]
    ) -> None:
        try:
            while True:
                name, args, raw = await read_command(reader, self.limits)
                if name not in self.commands:
                    raise Refused(f"{name.upper()!r} is not a command clients may send")
                check_login(name, args)
                last[0] = time.monotonic()
                up.write(raw)
                await up.drain()
        except Refused as exc:
            log.warning("closed a connection from %s: %s", source, exc)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass

    async def _replies(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, last: list[float]) -> None:
        try:
            while data := await up.read(_READ_CHUNK):
                last[0] = time.monotonic()
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.limits.slow_reader_s)
        except (asyncio.TimeoutError, ConnectionError):
            pass

    async def _idle(self, last: list[float]) -> None:
        while True:
            left = last[0] + self.limits.idle_timeout_s - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)


def parse_address(value: str, default_port: int = 6379) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        return value.strip("[]"), default_port
    return host.strip("[]"), int(port)


def run_gateway(listen: str, upstream: str, limits: GatewayLimits) -> None:
    """Serve until interrupted."""
    gateway = Gateway(parse_address(listen), parse_address(upstream), limits)
    log.info("redis-gateway on %s -> %s (%s)", listen, upstream, limits)
    asyncio.run(gateway.serve_forever())
