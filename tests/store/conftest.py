"""Fixtures: moto's S3 as a real HTTP server, a fault-injecting proxy in front of it, and
a ``store`` fixture parametrized over both backends."""

from __future__ import annotations

import http.client
import http.server
import threading
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

from chorus_mq.settings import Settings
from chorus_mq.store import open_store

BUCKET = "chorus-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on a free loopback port, with BUCKET created."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    return BUCKET


def _s3_store(endpoint: str, bucket: str = BUCKET):
    # A unique prefix per store keeps tests on the shared bucket apart.
    settings = Settings(s3_endpoint_url=endpoint, s3_region="us-east-1")
    return open_store(f"s3://{bucket}/t-{uuid.uuid4().hex[:12]}", settings)


@pytest.fixture
def make_s3_store(s3_endpoint):
    """``make_s3_store(endpoint=None, bucket=BUCKET)``: a fresh S3Store (default: moto)."""
    return lambda endpoint=None, bucket=BUCKET: _s3_store(endpoint or s3_endpoint, bucket)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A fresh, empty store of each kind."""
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store", Settings())
    return _s3_store(request.getfixturevalue("s3_endpoint"))


class FaultProxy:
    """A loopback HTTP proxy to ``upstream`` that answers the next N requests itself
    with a canned S3 error, then passes requests through. Counts what it sees."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.failures_left = 0
        self.status, self.code = 503, "ServiceUnavailable"
        self.requests = 0
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.failures_left > 0
                    if fail:
                        proxy.failures_left -= 1
                        proxy.injected += 1
                if fail:
                    self._reply(proxy.status, {}, _error_xml(proxy.code))
                else:
                    self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
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

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail_next(self, n: int, status: int = 503, code: str = "ServiceUnavailable") -> None:
        with self._lock:
            self.failures_left, self.status, self.code = n, status, code
            self.requests = self.injected = 0


# Content-Length is kept: for HEAD it is the object size, not the (empty) body length.
_HOP = {"connection", "keep-alive", "transfer-encoding"}


def _error_xml(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message></Error>"
    ).encode()


@pytest.fixture
def fault_proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint)
    proxy._thread.start()
    try:
        yield proxy
    finally:
        proxy._server.shutdown()
        proxy._server.server_close()
