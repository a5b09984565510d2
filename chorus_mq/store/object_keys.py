"""Object keys: what a safe relative key looks like, and sha256 arguments."""

from __future__ import annotations

import re

from ..errors import ConfigError

# S3's rules for new buckets, which MinIO enforces too.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Control characters would make keys ambiguous in logs and some S3 tools.
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class InvalidKey(ConfigError, ValueError):
    """An object key that could escape the store's prefix or is otherwise unsafe."""

    code = "invalid_key"


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative key; raise :class:`InvalidKey` otherwise.

    Segments may not be empty, ``.``/``..`` or start with ``.`` (the file backend keeps
    its temp files there). With ``prefix=True`` the empty string and a trailing ``/``
    are allowed, for listing.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a string, got {type(key).__name__}")
    body = key
    if prefix:
        if key == "":
            return key
        body = key.removesuffix("/")
    problem = None
    if body == "":
        problem = "it is empty"
    elif body.startswith("/"):
        problem = "it starts with '/'"
    elif _BAD_CHARS.search(body):
        problem = "it contains a backslash, NUL or control character"
    elif any(seg == "" for seg in body.split("/")):
        problem = "it has an empty segment ('//' or a trailing '/')"
    elif any(seg.startswith(".") for seg in body.split("/")):
        problem = "a segment starts with '.' ('.', '..' and hidden names are reserved)"
    if problem:
        raise InvalidKey(f"invalid object key {key!r}: {problem}")
    return key


def check_sha256(value: str | None) -> str | None:
    """Lower-case ``value`` and check it is 64 hex digits (``None`` passes through)."""
    if value is None:
        return None
    lowered = value.lower() if isinstance(value, str) else value
    if not isinstance(lowered, str) or not _SHA256.fullmatch(lowered):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {value!r}")
    return lowered


def check_bucket(bucket: str) -> str:
    """Return ``bucket`` if it is a valid S3 bucket name; raise :class:`ConfigError` otherwise."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"invalid bucket name {bucket!r}: use 3-63 lower-case letters, digits, '.' and '-'")
    return bucket
