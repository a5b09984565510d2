"""Client sampling, in Python: the same rule the round scripts apply when they open a round.

A federation with ``clients_per_round`` K > 0 draws, for round r, the K active clients with
the smallest ``sha1(seed:r:client)`` (the prelude's ``draw_from``); with fewer than K active
clients a round is open to all of them. The seed is a per-federation secret in the workers-only
``secrets`` hash: a client learns a draw when its round opens (``round_opened``), never before.

A sampled round waits on the clients it drew, so sampling needs a deadline that ends the round
and draws again (:func:`check_progress`). A buffered federation draws each buffer when it opens; a buffer
that its flush timeout finds short of ``--min-buffer`` keeps its deltas and is drawn again
(:func:`redraw_label`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from typing import Protocol

from ..errors import ConfigError
from ..names import ExpirePolicy

#: how many hashes one look-ahead may cost at most (a refused upload must stay cheap to answer)
MAX_LOOKAHEAD_HASHES = 200_000


class _Sampling(Protocol):
    """What :func:`check_progress` reads of a ``FederationConfig``."""

    @property
    def clients_per_round(self) -> int: ...

    @property
    def round_timeout(self) -> int: ...

    @property
    def expire_policy(self) -> ExpirePolicy: ...

    @property
    def buffered(self) -> bool: ...


def check_progress(cfg: _Sampling) -> None:
    """Refuse a configuration under which a round can wait on specific clients forever.

    Client sampling (``clients_per_round`` > 0) makes a round wait on the K clients it drew: one of
    them that never uploads (offline, revoked, hostile) would hold the federation. Such a round
    needs a deadline (``round_timeout``) that ends it and draws again (``expire_policy expire``);
    ``extend`` would keep waiting on the same draw for ever.
    """
    if cfg.clients_per_round <= 0:
        return
    if cfg.buffered:
        if cfg.round_timeout <= 0:
            raise ConfigError(
                f"--clients-per-round {cfg.clients_per_round} needs --flush-timeout SECONDS in a buffered "
                "federation: a buffer waits on the clients it drew, and without a deadline one of them that never "
                "uploads stalls the federation for ever (at the deadline a buffer short of --min-buffer is drawn "
                "again, keeping the deltas it holds)"
            )
        return
    if cfg.round_timeout <= 0:
        raise ConfigError(
            f"--clients-per-round {cfg.clients_per_round} needs --round-timeout SECONDS: a sampled round waits "
            "on the clients it drew, and without a deadline one of them that never uploads stalls the "
            "federation for ever"
        )
    if ExpirePolicy(cfg.expire_policy) is not ExpirePolicy.EXPIRE:
        raise ConfigError(
            f"--clients-per-round {cfg.clients_per_round} needs --expire-policy expire: with "
            f"'{ExpirePolicy(cfg.expire_policy).value}' a round whose drawn clients do not upload waits on "
            "the same draw for ever; expire ends it at the deadline and draws again"
        )


def rank_key(seed: str, round_: int | str, client: str) -> str:
    """What the scripts sort by: ``redis.sha1hex(seed .. ":" .. round .. ":" .. client)`` (``round_`` a round
    number, or a buffer's :func:`redraw_label`)."""
    label = round_ if isinstance(round_, str) else int(round_)
    return hashlib.sha1(f"{seed}:{label}:{client}".encode()).hexdigest()


def redraw_label(round_: int, redraws: int) -> str:
    """What a buffered federation's open buffer ``round_`` is drawn under after its ``redraws``-th flush timeout
    that found it short of ``--min-buffer`` (``close_round.lua``): ``"r.e"``; its first draw is ``r``'s own."""
    return f"{int(round_)}.{int(redraws)}"


def draw(seed: str, round_: int | str, active: Collection[str], k: int) -> tuple[str, ...]:
    """The clients of ``round_``, sorted; empty (everyone may take part) when k is 0 or too few are active."""
    if k <= 0 or len(active) < k:
        return ()
    ranked = sorted(active, key=lambda c: (rank_key(seed, round_, c), c))
    return tuple(sorted(ranked[:k]))


def selected_in(seed: str, round_: int, client: str, active: Collection[str], k: int) -> bool:
    """Whether ``client`` may take part in ``round_`` (without sorting everyone)."""
    if client not in active:
        return False
    if k <= 0 or len(active) < k:
        return True
    mine = (rank_key(seed, round_, client), client)
    ahead = 0
    for other in active:
        if other != client and (rank_key(seed, round_, other), other) < mine:
            ahead += 1
            if ahead >= k:
                return False
    return True


def next_selected_round(seed: str, client: str, active: Collection[str], k: int, after_round: int) -> int | None:
    """The first round after ``after_round`` that draws ``client``, given today's active clients.

    None when the client is not active, or not drawn within the look-ahead (about 20 N/K rounds,
    bounded by :data:`MAX_LOOKAHEAD_HASHES`). Registering or revoking clients changes the answer.
    """
    if client not in active:
        return None
    if k <= 0 or len(active) < k:
        return after_round + 1
    horizon = min(20 * math.ceil(len(active) / k) + 1, max(1, MAX_LOOKAHEAD_HASHES // len(active)))
    for r in range(after_round + 1, after_round + 1 + horizon):
        if selected_in(seed, r, client, active, k):
            return r
    return None
