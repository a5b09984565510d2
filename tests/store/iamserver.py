"""A moto server of our own that enforces IAM policies on S3, for least-privilege tests.

moto checks policies in server mode once authentication is switched on (``/moto-api/reset-auth``),
for the whole process, so this runs apart from the session's shared S3 server. It runs through
moto_iam.py, which makes every moto version judge S3 operations by IAM's action names. The bucket and an
admin user are made while authentication is still off; after that every request needs keys.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from chorus_mq.store import S3Credentials

from ..services import free_port

BUCKET = "chorus-iam"
_CONFIG = Config(
    signature_version="s3v4",
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    retries={"mode": "standard", "max_attempts": 1},
)
_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass(frozen=True)
class AuthS3:
    """An S3 + IAM endpoint that enforces policies, with an admin key pair."""

    url: str
    bucket: str
    admin: S3Credentials

    def client(self, service: str, keys: S3Credentials | None = None) -> Any:
        """A boto3 client for ``service`` signing with ``keys`` (default: the admin's)."""
        keys = keys or self.admin
        return boto3.session.Session(
            aws_access_key_id=keys.access_key_id, aws_secret_access_key=keys.secret_access_key
        ).client(service, endpoint_url=self.url, region_name="us-east-1", config=_CONFIG)


@contextlib.contextmanager
def enforcing_moto() -> Iterator[AuthS3]:
    """Start moto's server (through moto_iam.py) on a free port, prepare it, switch authentication on; yield it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("moto_iam.py")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
        anyone = S3Credentials("testing", "testing")  # accepted while authentication is off
        boot = AuthS3(url, BUCKET, anyone)
        boot.client("s3").create_bucket(Bucket=BUCKET)
        iam = boot.client("iam")
        iam.create_user(UserName="operator")
        iam.put_user_policy(UserName="operator", PolicyName="all", PolicyDocument=json.dumps(_ALL))
        key = iam.create_access_key(UserName="operator")["AccessKey"]
        request = urllib.request.Request(
            f"{url}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        yield AuthS3(url, BUCKET, S3Credentials(key["AccessKeyId"], key["SecretAccessKey"], user="operator"))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto.server exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise RuntimeError(f"moto.server did not start at {url}")
