"""``s3://bucket/prefix``: any S3-compatible store through boto3 (AWS, MinIO, moto).

Every call this backend makes for puts and reads of single objects needs only ``s3:PutObject``
or ``s3:GetObject`` on that object, so a federation client's least-privilege keys (see
:mod:`.policy`) work: no HeadBucket, no ListBucket, and no HeadObject either (objects are sized
with a one-byte ranged GET). Without ``s3:ListBucket``, real S3 answers 403, not 404, for a key
that does not exist: client code never probes keys that may be absent except where noted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.retries.standard import RetryEventAdapter, StandardRetryConditions

from ..errors import ChorusError, ObjectExists, ObjectMissing, StoreError
from .base import Store
from .objects import Head
from .policy import S3Credentials
from .spool import read_chunks

# The keys themselves are wrong, expired or unknown (as opposed to lacking a permission).
_BAD_KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

#: the IAM permission each operation of this backend needs
_PERMISSIONS = {
    "HEAD": "s3:GetObject",
    "GET": "s3:GetObject",
    "PUT": "s3:PutObject",
    "COPY": "s3:GetObject on the source and s3:PutObject",
    "LIST": "s3:ListBucket",
    "DELETE": "s3:DeleteObject",
}

MiB = 1024 * 1024
GiB = 1024 * MiB
#: S3's limit on the parts of one multipart upload
MAX_PARTS = 10_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Transport:
    """How long the store waits and how often it tries (``CHORUS_S3_CONNECT_TIMEOUT`` etc.).

    botocore's own defaults (60 s to connect, 60 s per read, backoff up to 20 s between attempts)
    kept a user waiting 30-48 s in silence before an unreachable store was reported.
    """

    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    #: attempts on transient errors: 5xx, throttling, timeouts, connections dropped mid-request
    max_attempts: int = 5
    #: attempts when no connection can be made at all (refused, unreachable): a store that is down
    #: is reported within seconds; a worker's task retries later anyway
    connect_attempts: int = 3
    #: backoff before attempt n+1: uniform in [0, min(cap, base * 2**(n-1))] (full jitter)
    backoff_base: float = 0.25
    backoff_cap: float = 4.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        return random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))


class _Retries:
    """botocore's ``needs-retry`` handler with our bounds, saying in the log what it retries and why.

    botocore's standard conditions decide what is transient (its own retries are off); this adds the
    bound on connection failures, a short backoff, and one warning per retry naming the endpoint.
    """

    def __init__(self, transport: S3Transport):
        self.transport = transport
        self._conditions = StandardRetryConditions(max_attempts=transport.max_attempts)
        self._adapter = RetryEventAdapter()

    def __call__(self, **kwargs: Any) -> float | None:
        attempts = int(kwargs["attempts"])
        error = kwargs.get("caught_exception")
        unreachable = isinstance(error, (EndpointConnectionError, ConnectTimeoutError))
        limit = min(self.transport.connect_attempts, self.transport.max_attempts) if unreachable else None
        if limit is not None and attempts >= limit:
            return None
        if not self._conditions.is_retryable(self._adapter.create_retry_context(**kwargs)):
            return None
        delay = self.transport.delay(attempts)
        operation = getattr(kwargs.get("operation"), "name", "request")
        url = str(kwargs.get("request_dict", {}).get("url", "")).split("?", 1)[0]
        log.warning(
            "S3 %s %s: %s; retrying in %.1f s (attempt %d of %d)",
            operation,
            url,
            _cause(error, kwargs.get("response")),
            delay,
            attempts + 1,
            limit or self.transport.max_attempts,
        )
        return delay


def _cause(error: BaseException | None, response: Any) -> str:
    if error is not None:
        return str(error) or type(error).__name__
    if response is not None:
        http, parsed = response
        code = (parsed or {}).get("Error", {}).get("Code") or ""
        return f"HTTP {getattr(http, 'status_code', '?')} {code}".rstrip()
    return "no answer"


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``. Write-once uses ``If-None-Match: *``."""

    #: files above this go up in parts, so a failed part is retried alone
    multipart_threshold = 128 * MiB
    #: part size for multipart uploads (S3's minimum is 5 MiB)
    part_size = 64 * MiB
    #: the largest object one CopyObject may copy (S3's limit); larger ones are copied in parts
    copy_limit = 5 * GiB
    #: part size for those copies (UploadPartCopy)
    copy_part_size = 512 * MiB

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        region: str,
        credentials: S3Credentials | None = None,
        spool_dir: str | None = None,
        transport: S3Transport | None = None,
    ):
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.credentials = credentials
        self.spool_dir = spool_dir
        self.transport = transport or S3Transport()
        self._client_pid: int | None = None
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The boto3 S3 client (made lazily, and again after a fork)."""
        # A boto3 client's connection pool must not be shared between Celery's prefork children.
        if self._client_pid != os.getpid():
            transport = self.transport
            config = Config(
                signature_version="s3v4",
                connect_timeout=transport.connect_timeout,
                read_timeout=transport.read_timeout,
                # botocore's retries off: _Retries decides (its conditions, our bounds and backoff, a log line)
                retries={"mode": "standard", "total_max_attempts": 1},
                # Some S3-compatible stores reject boto3's default CRC32 checksums;
                # integrity is ours to check anyway (sha256 on every read).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            keys = self.credentials
            session = boto3.session.Session(
                aws_access_key_id=keys.access_key_id if keys else None,
                aws_secret_access_key=keys.secret_access_key if keys else None,
                aws_session_token=keys.session_token if keys else None,
            )
            client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
            client.meta.events.register("needs-retry.s3", _Retries(transport))
            self._client = client
            self._client_pid = os.getpid()
        return self._client

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- primitives -------------------------------------------------------------------
    def _head(self, key: str) -> Head | None:
        # A one-byte ranged GET, not HeadObject: IAM authorises both with s3:GetObject, but some
        # evaluators (moto 5.2.6) check HeadObject against an "s3:HeadObject" action that IAM does
        # not have, refusing a client's reads under its least-privilege policy. A GET also carries
        # an error body, so a missing bucket (NoSuchBucket) and key (NoSuchKey) are told apart.
        try:
            with self._errors(key, "HEAD"):
                try:
                    resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key), Range="bytes=0-0")
                except ClientError as exc:
                    if _code(exc) != "InvalidRange":
                        raise
                    # Only an empty object cannot serve byte 0.
                    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                    return Head(size=0, etag=headers.get("etag"))
                resp["Body"].close()
        except ObjectMissing:
            return None
        match = _CONTENT_RANGE.fullmatch(resp.get("ContentRange") or "")
        if match is not None and match[3] != "*":
            size = int(match[3])
        elif match is None and resp.get("ContentLength") is not None:
            size = int(resp["ContentLength"])  # a store that ignored the Range: the whole object's length
        else:
            raise StoreError(f"GET {self.url_for(key)}: no object size in the answer ({resp.get('ContentRange')!r})")
        return Head(size=size, etag=resp.get("ETag"))

    def _probably_exists(self, key: str) -> bool:
        """A hint only: False when the key is missing *or* its probe is refused.

        A client's keys lack s3:ListBucket, so real S3 answers 403 for its own key that does not
        exist yet; the write that follows is conditional anyway and fails clearly if refused.
        """
        try:
            return self._head(key) is not None
        except StoreError:
            return False

    def _chunks(self, key: str, head: Head, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        extra = {"IfMatch": head.etag} if head.etag else {}
        if start > 0 or (end is not None and end < head.size):
            extra["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        with self._errors(key, "GET"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key), **extra)["Body"]
            with contextlib.closing(body):
                yield from read_chunks(body)

    def _range(self, key: str, start: int, end: int) -> bytes:
        with self._errors(key, "GET"):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}")
            except ClientError as exc:
                if _code(exc) == "InvalidRange":
                    return b""  # start at or past the end, as data[start:end] would give
                raise
            with contextlib.closing(resp["Body"]) as body:
                data: bytes = body.read()
        match = _CONTENT_RANGE.fullmatch(resp.get("ContentRange") or "")
        if match is None:
            return data[start:end]  # a store that ignored the Range sent the whole object
        first, last = int(match[1]), int(match[2])
        if first != start or len(data) != last - first + 1:
            raise StoreError(
                f"GET {self.url_for(key)} bytes {start}-{end - 1}: got {len(data)} bytes for "
                f"{resp.get('ContentRange')}; the transfer was cut short, retry"
            )
        return data

    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None:
        cond = {"IfNoneMatch": "*"} if write_once else {}
        if size > self.multipart_threshold:
            if write_once and self._probably_exists(key):
                # Saves uploading gigabytes for nothing; the guarantee is the condition below.
                raise ObjectExists(f"object {self.url_for(key)} already exists (write-once)")
            self._multipart(key, src, cond, size=size)
            return
        with self._errors(key, "PUT", write=True):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=src, ContentLength=size, **cond)

    def _multipart(self, key: str, src: BinaryIO, cond: dict[str, str], *, size: int = 0) -> None:
        full = self._full(key)
        part = max(self.part_size, math.ceil(size / MAX_PARTS))
        with self._errors(key, "PUT", write=True):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
            try:
                parts = []
                for number, chunk in enumerate(iter(lambda: src.read(part), b""), 1):
                    resp = self.client.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                # S3 checks If-None-Match at completion: that is the atomic write-once.
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond
                )
            except BaseException:
                self._abort(full, upload_id)
                raise

    def _copy(self, src: str, dst: str, head: Head) -> None:
        # Early refusal without moving anything; the guarantee is If-None-Match on the copy itself.
        if self._head(dst) is not None:
            raise ObjectExists(f"object {self.url_for(dst)} already exists (write-once)")
        source = {"Bucket": self.bucket, "Key": self._full(src)}
        # The source must still be the version we sized (a client may overwrite its own deltas).
        match = {"CopySourceIfMatch": head.etag} if head.etag else {}
        if head.size > self.copy_limit:
            self._multipart_copy(src, dst, head, source, match)
            return
        try:
            with self._errors(dst, "COPY", write=True):
                self.client.copy_object(
                    Bucket=self.bucket, Key=self._full(dst), CopySource=source, IfNoneMatch="*", **match
                )
        except ObjectExists:
            # 412 is either condition failing: tell them apart.
            if self._head(dst) is None:
                raise StoreError(f"{self.url_for(src)} changed since it was sized; retry") from None
            raise

    def _multipart_copy(self, src: str, dst: str, head: Head, source: dict[str, str], match: dict[str, str]) -> None:
        full = self._full(dst)
        part = max(self.copy_part_size, math.ceil(head.size / MAX_PARTS))
        with self._errors(dst, "COPY", write=True):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        try:
            parts = []
            for number, first in enumerate(range(0, head.size, part), 1):
                last = min(first + part, head.size) - 1
                # A 412 here means the source changed: not write-once, so it maps to a retry.
                with self._errors(src, "COPY"):
                    resp = self.client.upload_part_copy(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource=source,
                        CopySourceRange=f"bytes={first}-{last}",
                        **match,
                    )
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            with self._errors(dst, "COPY", write=True):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
        except BaseException:
            self._abort(full, upload_id)
            raise

    def _abort(self, full: str, upload_id: str) -> None:
        # Best effort: a client without s3:AbortMultipartUpload leaves it to the bucket's lifecycle rule.
        with contextlib.suppress(BotoCoreError, ClientError):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    def _writer_dir(self) -> str:
        return self._default_spool()

    def _default_spool(self) -> str:
        return self.spool_dir or tempfile.gettempdir()

    def _place(self, tmp: str, key: str, size: int) -> None:
        with open(tmp, "rb") as src:
            self._put(key, src, size, write_once=True)

    def _list(self, prefix: str) -> Iterable[str]:
        base = self._full("")  # "prefix/" or ""
        with self._errors(prefix, "LIST"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(base) :]

    def _delete(self, key: str) -> None:
        with self._errors(key, "DELETE", write=True):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    # -- errors -----------------------------------------------------------------------
    def _no_bucket(self) -> str:
        return (
            f"bucket {self.bucket} does not exist{self._where()}; create it "
            "(docker compose does this with the minio-init service)"
        )

    def _where(self) -> str:
        endpoint = self.endpoint_url
        if endpoint is None and self._client is not None:
            endpoint = self._client.meta.endpoint_url  # AWS's, for this region
        return f" at {endpoint}" if endpoint else ""

    @contextlib.contextmanager
    def _errors(self, key: str, op: str, *, write: bool = False) -> Iterator[None]:
        """Turn boto3/botocore failures (after boto3's own retries) into ChorusErrors."""
        url = self.url_for(key)
        try:
            yield
        except ChorusError:
            raise
        except ClientError as exc:
            raise self._client_error(exc, key, op, write) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"{op} {url}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or another boto3 credential source)"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(
                f"{op} {url} failed{self._where()} after retries: {exc}; "
                "is the object store up and reachable (CHORUS_S3_ENDPOINT_URL)? Retry later"
            ) from exc

    def _client_error(self, exc: ClientError, key: str, op: str, write: bool) -> ChorusError:
        url = self.url_for(key)
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message") or ""
        if status == 412 or code == "PreconditionFailed":
            if write:
                return ObjectExists(f"object {url} already exists (write-once)")
            return StoreError(f"{op} {url}: the object changed while being read; retry")
        if code in _MISSING_CODES:
            return ObjectMissing(f"object {url} does not exist")
        if code == "NoSuchBucket":
            return StoreError(self._no_bucket())
        if code in _BAD_KEY_CODES or status == 401:
            return StoreError(
                f"{op} {url} was refused ({code}, HTTP {status}): check the S3 credentials "
                f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and their access to bucket "
                f"{self.bucket}{self._where()}"
            )
        if status == 403 or code in _DENIED_CODES:
            return StoreError(self._denied(key, op, code, status))
        return StoreError(
            f"{op} {url} failed after retries: {code} (HTTP {status}) {message}".rstrip() + "; retry later"
        )

    def _denied(self, key: str, op: str, code: str, status: int | None) -> str:
        arn = f"arn:aws:s3:::{self.bucket}/{self._full(key)}"
        needs = _PERMISSIONS.get(op, "a permission")
        label = "AccessDenied" if code == "403" else code
        text = (
            f"{op} {self.url_for(key)} was refused ({label}, HTTP {status}): the S3 credentials in use lack "
            f"{needs} on {arn}. A federation client's keys allow only s3:PutObject/s3:GetObject under "
            "its own <federation>/deltas/<client>/ prefix and s3:GetObject under <federation>/rounds/ "
            "and <federation>/snapshots/"
        )
        if op in ("HEAD", "GET"):
            text += "; without s3:ListBucket, S3 also answers 403 for objects that do not exist"
        if code == "403":
            # A HEAD answer has no body, so no error code: it could also be keys the store does not know.
            text += " (a HEAD refusal carries no reason: the keys themselves may be invalid; see AWS_ACCESS_KEY_ID)"
        return text


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
