"""A secure round's public parameters: who is in the cohort, K, T, the graph seed, the encoding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import ConfigError
from ..ids import check_name
from . import graph
from .encoding import Encoding

#: the fewest clients a secure round can have: a sum of 2 reveals each to the other
MIN_COHORT = 3


def default_threshold(k: int) -> int:
    """T = floor(K/2) + 1: more than half the neighbours, so no two disjoint groups can both reach T."""
    return k // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Everything every party must agree on before the first message (all of it public).

    ``cohort`` is the clients the operator fixed for the round (sorted); ``length`` the number
    of encoded elements in every input. A client's Shamir x-coordinate is its 1-based position
    in ``cohort``. ``threshold`` T must exceed K/2: an honest client reveals one share per peer,
    so an aggregator can never gather T shares of both kinds of one peer. Up to K - T of any
    client's neighbours may drop and the round still unmasks.
    """

    federation: str
    round: int
    cohort: tuple[str, ...]
    length: int
    graph_seed: bytes
    neighbour_count: int = 0  # 0: graph.default_neighbours(N)
    threshold: int = 0  # 0: default_threshold(K)
    encoding: Encoding = field(default_factory=Encoding)

    def __post_init__(self) -> None:
        check_name(self.federation, "federation")
        cohort = tuple(self.cohort)
        for c in cohort:
            check_name(c, "client id")
        if list(cohort) != sorted(set(cohort)):
            raise ConfigError("the secure-aggregation cohort must be sorted and without duplicates")
        object.__setattr__(self, "cohort", cohort)
        n = len(cohort)
        if n < MIN_COHORT:
            raise ConfigError(
                f"secure aggregation needs at least {MIN_COHORT} clients (a sum of 2 reveals each to the other), "
                f"got {n}"
            )
        if n > self.encoding.max_inputs:
            raise ConfigError(f"{n} clients exceed the {self.encoding.max_inputs} inputs this encoding can sum")
        if self.round < 0 or self.length < 1:
            raise ConfigError("a secure round needs a round >= 0 and an input length >= 1")
        if len(self.graph_seed) < 16:
            raise ConfigError("the graph seed must be at least 16 bytes")
        k = self.neighbour_count or graph.default_neighbours(n)
        graph.check_neighbours(n, k)
        t = self.threshold or default_threshold(k)
        if not k / 2 < t <= k:
            raise ConfigError(f"the threshold must be above K/2 = {k / 2:g} and at most K = {k}, got {t}")
        object.__setattr__(self, "neighbour_count", k)
        object.__setattr__(self, "threshold", t)

    @property
    def tolerated_dropouts(self) -> int:
        """K - T: how many of one client's neighbours may drop with the round still unmasking."""
        return self.neighbour_count - self.threshold

    @cached_property
    def graph(self) -> Mapping[str, frozenset[str]]:
        return graph.neighbours(self.cohort, self.neighbour_count, self.graph_seed)

    def x_of(self, client: str) -> int:
        """A client's Shamir x-coordinate (1-based position in the cohort)."""
        return self.cohort.index(client) + 1

    def mask_sign(self, me: str, peer: str) -> int:
        """+1 for the smaller id of a pair, -1 for the larger, so the pair's masks cancel in the sum."""
        return 1 if me < peer else -1
