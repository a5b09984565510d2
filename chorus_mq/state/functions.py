"""The Redis Function library clients append through (``lua/chorus_functions.lua``), with its limits.

Workers load it at startup (``FUNCTION LOAD REPLACE``, so their settings win); Redis keeps it in the AOF
across restarts. The limits are written into the library's text, never taken from a caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import redis as redis_lib
from redis import Redis

from ..messages import RECORD_FIELD
from ..names import FUNCTION_LIBRARY

#: inbox records one client may have waiting (read or not) before its appends are refused
DEFAULT_MAX_RECORDS = 64
#: the largest record an inbox accepts (the workers' ``CHORUS_MAX_INBOX_RECORD_BYTES``)
DEFAULT_MAX_RECORD_BYTES = 16 * 1024


@dataclass(frozen=True)
class InboxLimits:
    """What one client's inbox may hold: ``max_records`` records of at most ``max_record_bytes`` each."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_records: int = DEFAULT_MAX_RECORDS

    def __post_init__(self) -> None:
        if self.max_record_bytes < 1 or self.max_records < 1:
            raise ValueError(f"inbox limits must be positive: {self}")


@cache
def _template() -> str:
    return (resources.files("chorus_mq.state") / "lua" / "chorus_functions.lua").read_text()


def library_source(limits: InboxLimits) -> str:
    """The library's text with ``limits`` written in."""
    return (
        _template()
        .replace("{{MAX_RECORD_BYTES}}", str(int(limits.max_record_bytes)))
        .replace("{{MAX_RECORDS}}", str(int(limits.max_records)))
        .replace("{{RECORD_FIELD}}", RECORD_FIELD)
    )


def load_functions(redis: Redis, limits: InboxLimits, *, replace: bool = True) -> bool:
    """FUNCTION LOAD the library; with ``replace=False`` an already loaded one is kept. True when loaded."""
    try:
        redis.function_load(library_source(limits), replace=replace)
    except redis_lib.ResponseError as exc:
        if not replace and "already exists" in str(exc):
            return False
        raise
    return True


def loaded(redis: Redis) -> bool:
    """Whether this Redis has the library."""
    return bool(redis.function_list(library=FUNCTION_LIBRARY))
