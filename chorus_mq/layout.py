"""Where things live in object storage: the only place object keys are spelled.

Keys are relative to the store's prefix. Clients may write only under their own
``deltas/<client>/`` prefix (their S3 policy says so); everything else is written by
workers, and every object a worker reads back is checked against a hash held in Redis.
"""

from __future__ import annotations

from .ids import check_name

_HEX = frozenset("0123456789abcdef")
#: what a shard writes: the adapter part, the residual part, and the server optimiser's state
SHARD_PARTS = ("adapter", "residual", "variate", "opt-state")


def _check_sha(sha256: str) -> str:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return sha256


def federation_prefix(federation: str) -> str:
    return f"{check_name(federation, 'federation name')}/"


def client_prefix(federation: str, client: str) -> str:
    """The only prefix a client's credentials may write to."""
    return f"{check_name(federation, 'federation name')}/deltas/{check_name(client, 'client id')}/"


def delta_key(federation: str, client: str, sha256: str) -> str:
    """Content-addressed, under the client's own name: what the client uploads."""
    return f"{client_prefix(federation, client)}{_check_sha(sha256)}.safetensors"


def masked_input_key(federation: str, client: str, round_: int, sha256: str) -> str:
    """A secure round's masked input (uint64 safetensors), under the client's own prefix like its deltas."""
    return f"{client_prefix(federation, client)}secagg-{int(round_):06d}-{_check_sha(sha256)}.safetensors"


def accepted_key(federation: str, client: str, sha256: str) -> str:
    """The worker's own copy of an accepted delta, out of the client's reach."""
    check_name(federation, "federation name")
    check_name(client, "client id")
    return f"{federation}/accepted/{client}/{_check_sha(sha256)}.safetensors"


def index_key(federation: str, client: str, sha256: str) -> str:
    """The worker-written index of an accepted delta (spans, digests, scalings, norms)."""
    check_name(federation, "federation name")
    check_name(client, "client id")
    return f"{federation}/index/{client}/{_check_sha(sha256)}.json"


def round_prefix(federation: str, round_: int) -> str:
    return f"{check_name(federation, 'federation name')}/rounds/{round_:06d}"


def rounds_prefix(federation: str) -> str:
    """Everything a round publishes (readable by the federation's clients)."""
    return f"{check_name(federation, 'federation name')}/rounds/"


def snapshots_prefix(federation: str) -> str:
    """Compacted corrections (readable by the federation's clients)."""
    return f"{check_name(federation, 'federation name')}/snapshots/"


def manifest_key(federation: str, round_: int) -> str:
    """Written last, write-once: its existence is the round's commit marker."""
    return f"{round_prefix(federation, round_)}/manifest.json"


def shard_key(federation: str, round_: int, shard: int, part: str, sha256: str) -> str:
    """A shard's output (``part`` is ``adapter``, ``residual``, with SCAFFOLD ``variate``, or ``opt-state``, the
    server optimiser's state), content-addressed: reruns never collide."""
    if part not in SHARD_PARTS:
        raise ValueError(f"shard part must be one of {', '.join(SHARD_PARTS)}, got {part!r}")
    return f"{round_prefix(federation, round_)}/shard-{shard:03d}-{part}-{_check_sha(sha256)[:16]}.safetensors"


def snapshot_key(federation: str, round_: int, sha256: str) -> str:
    """The cumulative correction of every round up to ``round_``, compacted off the critical path."""
    return f"{snapshots_prefix(federation)}{round_:06d}/cumulative-{_check_sha(sha256)[:16]}.safetensors"
