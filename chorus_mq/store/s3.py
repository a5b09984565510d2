"""``s3://bucket/prefix``: any S3-compatible store through boto3 (AWS, MinIO, moto)."""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Iterable, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from ..errors import ChorusError, ObjectExists, ObjectMissing, StoreError
from .base import Head, Store, read_chunks

_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}

MiB = 1024 * 1024


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``. Write-once uses ``If-None-Match: *``."""

    #: files above this go up in parts, so a failed part is retried alone
    multipart_threshold = 128 * MiB
    #: part size for multipart uploads (S3's minimum is 5 MiB)
    part_size = 64 * MiB

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None, region: str):
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self._client_pid: int | None = None
        self._bucket_checked = False

    @property
    def client(self):
        # Created lazily and again after fork: a boto3 client's connection pool must
        # not be shared between Celery's prefork children.
        if self._client_pid != os.getpid():
            config = Config(
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 5},
                # Some S3-compatible stores reject boto3's default CRC32 checksums;
                # integrity is ours to check anyway (sha256 on every read).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
            self._client_pid = os.getpid()
        return self._client

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- primitives -------------------------------------------------------------------
    def _head(self, key: str) -> Head | None:
        try:
            with self._errors(key, "HEAD"):
                resp = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ObjectMissing:
            # A HEAD 404 has no body, so a missing bucket looks like a missing key.
            self._check_bucket()
            return None
        return Head(size=resp["ContentLength"], etag=resp.get("ETag"))

    def _chunks(self, key: str, head: Head) -> Iterator[bytes]:
        extra = {"IfMatch": head.etag} if head.etag else {}
        with self._errors(key, "GET"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key), **extra)["Body"]
            with contextlib.closing(body):
                yield from read_chunks(body)

    def _range(self, key: str, start: int, end: int) -> bytes:
        with self._errors(key, "GET"):
            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}"
                )
            except ClientError as exc:
                if _code(exc) == "InvalidRange":
                    return b""  # start at or past the end, as data[start:end] would give
                raise
            return resp["Body"].read()

    def _put(self, key: str, src: BinaryIO, size: int, write_once: bool) -> None:
        cond = {"IfNoneMatch": "*"} if write_once else {}
        if size > self.multipart_threshold:
            if write_once and self._head(key) is not None:
                # Saves uploading gigabytes for nothing; the guarantee is the condition below.
                raise ObjectExists(f"object {self.url_for(key)} already exists (write-once)")
            self._multipart(key, src, cond)
            return
        with self._errors(key, "PUT", write=True):
            self.client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=src, ContentLength=size, **cond
            )

    def _multipart(self, key: str, src: BinaryIO, cond: dict) -> None:
        full = self._full(key)
        with self._errors(key, "PUT", write=True):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
            try:
                parts = []
                for number, chunk in enumerate(iter(lambda: src.read(self.part_size), b""), 1):
                    resp = self.client.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                # S3 checks If-None-Match at completion: that is the atomic write-once.
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **cond,
                )
            except BaseException:
                with contextlib.suppress(BotoCoreError, ClientError):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                raise

    def _list(self, prefix: str) -> Iterable[str]:
        base = self._full("")  # "prefix/" or ""
        with self._errors(prefix, "LIST"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(base):]

    def _delete(self, key: str) -> None:
        with self._errors(key, "DELETE", write=True):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    # -- errors -----------------------------------------------------------------------
    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        with self._errors("", "HEAD bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                    raise StoreError(self._no_bucket()) from exc
                raise
        self._bucket_checked = True

    def _no_bucket(self) -> str:
        return (
            f"bucket {self.bucket} does not exist{self._where()}; create it "
            "(docker compose does this with the minio-init service)"
        )

    def _where(self) -> str:
        return f" at {self.endpoint_url}" if self.endpoint_url else ""

    @contextlib.contextmanager
    def _errors(self, key: str, op: str, *, write: bool = False):
        """Turn boto3/botocore failures (after boto3's own retries) into ChorusErrors."""
        url = self.url_for(key)
        try:
            yield
        except ChorusError:
            raise
        except ClientError as exc:
            raise self._client_error(exc, url, op, write) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"{op} {url}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or another boto3 credential source)"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(
                f"{op} {url} failed{self._where()} after retries: {exc}; "
                "is the object store up and reachable? Retry later"
            ) from exc

    def _client_error(self, exc: ClientError, url: str, op: str, write: bool) -> ChorusError:
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
        if status in (401, 403) or code in _AUTH_CODES:
            return StoreError(
                f"{op} {url} was refused ({code}, HTTP {status}): check the S3 credentials "
                f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and their access to bucket "
                f"{self.bucket}{self._where()}. Without s3:ListBucket, S3 also answers 403 "
                "for objects that do not exist"
            )
        return StoreError(
            f"{op} {url} failed after retries: {code} (HTTP {status}) {message}".rstrip()
            + "; retry later"
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
