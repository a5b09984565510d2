"""The wire between Python and Redis: script replies and typed hash fields, parsed in one place.

Every Lua script replies ``{status, n, epoch, detail}``. Hash fields are strings: booleans
``"1"``/``"0"``, enums their value, ``None`` the empty string, tuples a JSON list, floats
``repr`` (so they round-trip exactly).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from ..errors import StateCorrupt
from ..names import ScriptStatus


@dataclass(frozen=True)
class Reply:
    """A script's answer. ``status`` is a :class:`ScriptStatus` (a ``str``); see each script's header."""

    status: ScriptStatus
    n: int
    epoch: int
    detail: str


def text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def opt_text(value: object) -> str | None:
    """A reply that may be nil, as text or None; anything else is not what chorus-mq stores there."""
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        return text(value)
    raise StateCorrupt(f"expected a string reply, got {value!r}")


def text_map(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def stream_items(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREAD/XREADGROUP replies as (stream, entries) pairs, whatever shape redis-py gives them.

    RESP2 gives ``[[stream, entries], ...]``; RESP3 a map, whose values redis-py may wrap in one
    more list. Each entry is ``(id, fields)``.
    """
    if not reply:
        return []
    pairs = list(reply.items()) if isinstance(reply, dict) else [(stream, entries) for stream, entries in reply]
    out: list[tuple[str, list[Any]]] = []
    for stream, entries in pairs:
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        out.append((text(stream), list(entries)))
    return out


def parse_reply(script: str, raw: object) -> Reply:
    """Parse one script reply; a ``wrong_type`` reply raises :class:`StateCorrupt` (nothing was changed)."""
    if not isinstance(raw, list) or len(raw) != 4:
        raise StateCorrupt(f"script {script} replied {raw!r}, not {{status, n, epoch, detail}}")
    status_raw, n, epoch, detail_raw = raw
    if not isinstance(status_raw, (str, bytes)) or not isinstance(detail_raw, (str, bytes)):
        raise StateCorrupt(f"script {script} replied {raw!r}: status and detail must be strings")
    if not isinstance(n, int) or not isinstance(epoch, int):
        raise StateCorrupt(f"script {script} replied {raw!r}: n and epoch must be integers")
    try:
        status = ScriptStatus(text(status_raw))
    except ValueError:
        raise StateCorrupt(f"script {script} replied an unknown status {text(status_raw)!r}") from None
    detail = text(detail_raw)
    if status is ScriptStatus.WRONG_TYPE:
        raise StateCorrupt(
            f"{script}: {detail}; nothing was changed. Inspect that key (TYPE, then DEL it if it is junk) and retry"
        )
    return Reply(status, n, epoch, detail)


# -- typed hash fields ----------------------------------------------------------------------


def encode_value(value: object) -> str:
    """One typed value as a hash field."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    raise TypeError(f"cannot store a {type(value).__name__} in a hash field")


def decode_value(tp: object, raw: str) -> Any:
    """Parse ``raw`` as type ``tp`` (the dataclass annotation); ``ValueError`` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "":
            return None
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return decode_value(args[0], raw)
    if origin is tuple:
        items = json.loads(raw) if raw else []
        if not isinstance(items, list):
            raise ValueError(f"expected a JSON list, got {raw!r}")
        (item_type, _ellipsis) = typing.get_args(tp)
        return tuple(decode_value(item_type, i if isinstance(i, str) else json.dumps(i)) for i in items)
    if tp is bool:
        if raw in ("1", "true", "True"):
            return True
        if raw in ("0", "false", "False", ""):
            return False
        raise ValueError(f"expected 1 or 0, got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            number = float(raw)  # Lua may write an integral number as "3.0" on other builds
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {raw!r}") from None
        return int(number)
    if tp is float:
        return float(raw)
    if tp is str:
        return raw
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(raw)
    raise TypeError(f"unsupported field type {tp!r}")


T = TypeVar("T")


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: configs and rounds are parsed often)."""
    hints = _FIELD_TYPES.get(cls)
    if hints is None:
        hints = _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return hints


def decode_fields(cls: type[T], h: Mapping[str, str], *, where: str) -> dict[str, Any]:
    """The fields of dataclass ``cls`` present in ``h``, each parsed to its annotated type."""
    hints = field_types(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in h or not f.init:
            continue
        try:
            out[f.name] = decode_value(hints[f.name], h[f.name])
        except (ValueError, TypeError) as exc:
            raise StateCorrupt(f"{where}: field {f.name}={h[f.name]!r} is not a {hints[f.name]}: {exc}") from None
    return out
