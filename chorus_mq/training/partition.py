"""Split one data set among simulated clients: ``iid``, ``dirichlet:ALPHA`` (label skew) or ``by:COLUMN``.

Every split is a pure function of the examples, the client count and the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from chorus_mq.errors import ConfigError, DataError
from chorus_mq.names import PartitionKind

from .data import Examples

#: a Dirichlet draw that leaves a client with fewer examples than this is redrawn
_MIN_PER_CLIENT = 2
_MAX_DRAWS = 1000


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value."""

    kind: PartitionKind
    alpha: float | None = None
    column: str | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``iid``, ``dirichlet:0.5`` or ``by:COLUMN``."""
        kind, _, arg = text.partition(":")
        if kind == PartitionKind.IID and not arg:
            return cls(PartitionKind.IID)
        if kind == PartitionKind.DIRICHLET:
            try:
                alpha = float(arg)
            except ValueError:
                alpha = float("nan")
            if not alpha > 0 or alpha == float("inf"):
                raise ConfigError(f"partition {text!r}: dirichlet needs a positive concentration, e.g. dirichlet:0.5")
            return cls(PartitionKind.DIRICHLET, alpha=alpha)
        if kind == PartitionKind.BY and arg:
            return cls(PartitionKind.BY, column=arg)
        raise ConfigError(f"partition {text!r}: use iid, dirichlet:ALPHA or by:COLUMN")

    def __str__(self) -> str:
        if self.kind == PartitionKind.DIRICHLET:
            return f"dirichlet:{self.alpha:g}"
        if self.kind == PartitionKind.BY:
            return f"by:{self.column}"
        return str(self.kind)


def partition(examples: Examples, clients: int, spec: PartitionSpec, *, seed: int = 0) -> list[list[int]]:
    """Disjoint row indices per client, covering every row (``by`` and ``iid``) or almost every row."""
    if clients < 1:
        raise ConfigError(f"need at least one client, got {clients}")
    if len(examples) < clients * _MIN_PER_CLIENT:
        raise DataError(f"{len(examples)} examples are too few for {clients} clients (at least {_MIN_PER_CLIENT} each)")
    rng = random.Random(seed)
    if spec.kind == PartitionKind.IID:
        order = list(range(len(examples)))
        rng.shuffle(order)
        return [sorted(order[i::clients]) for i in range(clients)]
    if spec.kind == PartitionKind.DIRICHLET:
        if examples.labels is None:
            raise DataError("a dirichlet partition skews labels: the examples have none (use iid or by:COLUMN)")
        assert spec.alpha is not None
        return _dirichlet(examples.labels, clients, spec.alpha, rng)
    if examples.groups is None:
        raise DataError(f"partition by:{spec.column} needs the examples loaded with group_column={spec.column!r}")
    return _by_group(examples.groups, clients, spec.column or "")


def _dirichlet(labels: tuple[int, ...], clients: int, alpha: float, rng: random.Random) -> list[list[int]]:
    """Each class's rows split by proportions drawn from Dir(alpha); redrawn while a client gets too few."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for rows in by_class.values():
        rng.shuffle(rows)
    for _ in range(_MAX_DRAWS):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for _label, rows in sorted(by_class.items()):
            weights = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
            total = sum(weights) or 1.0
            cut, start = 0.0, 0
            for c, w in enumerate(weights):
                cut += w / total
                end = len(rows) if c == clients - 1 else round(cut * len(rows))
                shares[c].extend(rows[start:end])
                start = end
        if min(len(s) for s in shares) >= _MIN_PER_CLIENT:
            return [sorted(s) for s in shares]
    raise DataError(
        f"dirichlet:{alpha:g} left some of {clients} clients with fewer than {_MIN_PER_CLIENT} "
        f"examples in {_MAX_DRAWS} draws; use more data, fewer clients or a larger alpha"
    )


def _by_group(groups: tuple[str, ...], clients: int, column: str) -> list[list[int]]:
    """Whole groups per client: largest first, each to the client holding the fewest rows so far."""
    rows: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        rows.setdefault(group, []).append(i)
    if len(rows) < clients:
        raise DataError(f"column {column!r} has {len(rows)} distinct values: fewer than {clients} clients")
    shares: list[list[int]] = [[] for _ in range(clients)]
    for _group, idx in sorted(rows.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        target = min(range(clients), key=lambda c: (len(shares[c]), c))
        shares[target].extend(idx)
    return [sorted(s) for s in shares]
