"""Validation of the names users choose: federations and clients end up in keys and paths."""

from __future__ import annotations

import re

from .errors import ConfigError

# fullmatch, not match: "$" would also accept a trailing newline
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a safe identifier (letters, digits, ``_.-``, not ``..``)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit, without '..'"
        )
    return value
