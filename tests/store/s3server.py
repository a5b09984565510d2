"""Test helpers: moto's S3 as a real HTTP server, and a fault-injecting proxy for it."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "chorus-test"


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET) -> Iterator[str]:
    """Run moto's S3 on a free loopback port with ``bucket`` created; yield its URL.

    Dummy AWS credentials are set in the environment meanwhile (moto accepts any).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on instance metadata
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        try:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield url
        finally:
            server.stop()


class FaultProxy:
    """A loopback HTTP proxy to ``upstream`` that answers the next N requests itself
    with a canned S3 error (or hangs up on them), then passes requests through.
    Counts what it sees."""

    #: how an injected fault looks to the client
    MODES = ("error", "drop", "stall", "lost")

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.failures_left = 0
        self.status, self.code = 503, "ServiceUnavailable"
        self.mode, self.match, self.stall_s = "error", None, 0.0
        self.requests = 0
        self.injected = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(
        self,
        n: int,
        status: int = 503,
        code: str = "ServiceUnavailable",
        *,
        mode: str = "error",
        match: str | None = None,
        stall_s: float = 2.0,
    ) -> None:
        """Fault the next ``n`` requests (those whose ``"METHOD path"`` matches the regular expression
        ``match``, if given); reset the counters.

        ``mode``: ``error`` answers ``status``/``code``; ``drop`` closes the connection without an
        answer (a reset); ``stall`` holds the request ``stall_s`` seconds, then closes it unanswered
        (a client with a shorter read timeout sees a timeout); ``lost`` passes the request on and
        then closes without the answer (the write happened, the client cannot know).
        """
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        with self._lock:
            self.failures_left, self.status, self.code = n, status, code
            self.mode, self.match, self.stall_s = mode, match, stall_s
            self.requests = self.injected = 0

    def _take_fault(self, request_line: str) -> str | None:
        """The fault mode to inject into this request, or None to pass it through."""
        with self._lock:
            self.requests += 1
            if self.failures_left <= 0 or (self.match and not re.search(self.match, request_line)):
                return None
            self.failures_left -= 1
            self.injected += 1
            return self.mode

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultProxy]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy._take_fault(f"{self.command} {self.path}")
                if mode is None:
                    self._forward(body)
                elif mode == "error":
                    self._reply(proxy.status, {}, _error_xml(proxy.code))
                else:
                    if mode == "stall":
                        time.sleep(proxy.stall_s)
                    elif mode == "lost":
                        self._forward(body, reply=False)
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

            def _forward(self, body: bytes, reply: bool = True):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
                    if reply:
                        self._reply(resp.status, headers, data)
                finally:
                    conn.close()

            def _reply(self, status: int, headers: dict, data: bytes):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "content-length" not in {k.lower() for k in headers}:
                    self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True

        return Handler


# Content-Length is kept: for HEAD it is the object size, not the (empty) body length.
_HOP = {"connection", "keep-alive", "transfer-encoding"}


def _error_xml(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message></Error>"
    ).encode()
