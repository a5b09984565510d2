"""The SecAgg+ neighbour graph: each client masks with (and shares its secrets among) K others.

Deterministic from a public seed, so every party computes the same graph: clients are ordered
on a ring by HMAC-SHA256(seed, id) and each is joined to the K/2 nearest on either side
(a Harary graph on a random permutation). K = N - 1 is the complete graph (classic SecAgg);
otherwise K must be even and at most N - 2.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError


def default_neighbours(n: int) -> int:
    """K = min(N - 1, 4 * ceil(log2 N)): O(log N) as in SecAgg+; the complete graph up to N = 17."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    return min(n - 1, 4 * math.ceil(math.log2(n)))


def check_neighbours(n: int, k: int) -> None:
    if not 1 <= k <= n - 1:
        raise ConfigError(f"the neighbour count must be in 1..{n - 1} for {n} clients, got {k}")
    if k != n - 1 and k % 2:
        raise ConfigError(f"the neighbour count must be even or {n - 1} (every other client), got {k}")


def neighbours(cohort: Sequence[str], k: int, seed: bytes) -> Mapping[str, frozenset[str]]:
    """Each client's K neighbours (a symmetric relation, nobody its own neighbour)."""
    n = len(cohort)
    if len(set(cohort)) != n:
        raise ConfigError("the cohort has duplicate client ids")
    check_neighbours(n, k)
    if k == n - 1:
        everyone = frozenset(cohort)
        return {c: everyone - {c} for c in cohort}
    ring = sorted(cohort, key=lambda c: hmac.new(seed, c.encode(), hashlib.sha256).digest())
    half = k // 2
    return {c: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0) for i, c in enumerate(ring)}
