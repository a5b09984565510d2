"""Object storage behind one small interface: ``s3://bucket/prefix`` and ``file:///path``.

Keys are relative to the URL's prefix. Every read can be size-capped and re-hashed
(:meth:`Store.download`), because neither moto nor every S3-compatible store
verifies checksums.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..settings import Settings
from .base import Store, InvalidKey, check_key

__all__ = ["Store", "InvalidKey", "check_key", "open_store"]

# S3's rules for new buckets, which MinIO enforces too.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def open_store(url: str, settings: Settings) -> Store:
    """Open the store named by ``url`` (usually ``settings.store``); no I/O happens yet."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ConfigError(f"invalid bucket name {bucket!r} in store URL {url!r}")
        prefix = prefix.rstrip("/")
        if prefix:
            check_key(prefix)
        from .s3 import S3Store  # boto3 is slow to import; file:// users don't need it

        return S3Store(bucket, prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not (path.startswith("/") or path in (".", "..") or path.startswith(("./", "../"))):
            raise ConfigError(
                f"store URL {url!r}: use file:///absolute/path or file://./relative/path"
            )
        from .file import FileStore

        return FileStore(path)
    raise ConfigError(
        f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path (CHORUS_STORE)"
    )
