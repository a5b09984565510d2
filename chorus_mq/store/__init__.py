"""Object storage behind one small interface: ``s3://bucket/prefix`` and ``file:///path``.

Keys are relative to the URL's prefix. Every read can be size-capped and is re-hashed
(:meth:`Store.download`, :meth:`Store.local_copy`), because neither moto nor every
S3-compatible store verifies checksums.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..settings import Settings
from .base import Store
from .object_keys import InvalidKey, check_bucket, check_key
from .objects import Head, LocalObject, ObjectWriter, WrittenObject
from .policy import S3Credentials

__all__ = [
    "Head",
    "InvalidKey",
    "LocalObject",
    "ObjectWriter",
    "S3Credentials",
    "Store",
    "WrittenObject",
    "check_key",
    "open_store",
    "split_s3_url",
]


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)``, both checked (prefix ``""`` when there is none)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"not an s3:// store URL: {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    try:
        check_bucket(bucket)
    except ConfigError:
        raise ConfigError(f"invalid bucket name {bucket!r} in store URL {url!r}") from None
    prefix = prefix.rstrip("/")
    if prefix:
        check_key(prefix)
    return bucket, prefix


def open_store(url: str, settings: Settings, *, credentials: S3Credentials | None = None) -> Store:
    """Open the store named by ``url`` (usually ``settings.store``); no I/O happens yet.

    ``credentials`` are explicit S3 keys (a client's, from ``client add``); without them boto3's
    usual sources apply (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, ...).
    """
    if url.startswith("s3://"):
        bucket, prefix = split_s3_url(url)
        from .s3 import S3Store, S3Transport  # boto3 is slow to import; file:// users don't need it

        return S3Store(
            bucket,
            prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            credentials=credentials,
            spool_dir=settings.spool_dir,
            transport=S3Transport(
                connect_timeout=settings.s3_connect_timeout,
                read_timeout=settings.s3_read_timeout,
                max_attempts=settings.s3_max_attempts,
            ),
        )
    if url.startswith("file://"):
        if credentials is not None:
            raise ConfigError(f"S3 credentials were given for the file store {url!r}; they apply to s3:// only")
        path = url.removeprefix("file://")
        if not (path.startswith(("/", "./", "../")) or path in (".", "..")):
            raise ConfigError(f"store URL {url!r}: use file:///absolute/path or file://./relative/path")
        from .file import FileStore

        return FileStore(path)
    raise ConfigError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path (CHORUS_STORE)")
