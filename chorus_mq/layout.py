"""Where things live in object storage. Keys are relative to the store's prefix."""

from __future__ import annotations

from .ids import check_name


def delta_key(federation: str, client: str, sha256: str) -> str:
    """Content-addressed, under the client's own name: an accepted delta is never overwritten."""
    check_name(federation, "federation name")
    check_name(client, "client id")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return f"{federation}/deltas/{client}/{sha256}.safetensors"


def round_prefix(federation: str, round_: int) -> str:
    return f"{federation}/rounds/{round_:06d}"


def manifest_key(federation: str, round_: int) -> str:
    """Written last, write-once: its existence is the round's commit marker."""
    return f"{round_prefix(federation, round_)}/manifest.json"


def artifact_key(federation: str, round_: int, name: str, sha256: str) -> str:
    """Content-addressed result objects: two runs of one aggregation never collide."""
    stem, _, ext = name.rpartition(".")
    return f"{round_prefix(federation, round_)}/{stem}-{sha256[:16]}.{ext}"
