"""Client weights of a round: the operator's policy, then a cap no single client can exceed.

A client's dataset size is its own claim. With the default cap no client takes more than
half of a round of three or more, however large its claim; the excess is spread over the
others in proportion to their weights (water-filling), so the order of the weights is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from chorus_mq.errors import AggregationError, ConfigError
from chorus_mq.names import WeightPolicy


def policy_weights(
    claims: Mapping[str, float | None],
    policy: WeightPolicy | str,
    *,
    registered: Mapping[str, float] | None = None,
    cap: float = 0.5,
) -> dict[str, float]:
    """Normalised weights for the clients of ``claims`` (client -> claimed dataset size, or None).

    * ``dataset-size``: the claims; uniform when any client gave none.
    * ``uniform``: equal weights.
    * ``registered``: the operator's registered weight (or dataset size) of each client;
      a client without one is refused with ConfigError.

    Then no weight exceeds ``max(cap, 1 / N)``. Claims and registered values must be finite
    and > 0 (AggregationError and ConfigError otherwise).
    """
    try:
        rule = WeightPolicy(policy)
    except ValueError:
        choices = ", ".join(WeightPolicy.values())
        raise ConfigError(f"unknown weight policy {policy!r}; choose one of {choices}") from None
    if not claims:
        raise AggregationError("no clients to weigh")
    cap = _cap(cap)
    for client, claim in claims.items():
        if claim is not None and not _positive(claim):
            raise AggregationError(f"client {client!r} claims a dataset size of {claim!r}; it must be finite and > 0")
    raw: dict[str, float]
    if rule == WeightPolicy.UNIFORM or (rule == WeightPolicy.DATASET_SIZE and None in claims.values()):
        raw = dict.fromkeys(claims, 1.0)
    elif rule == WeightPolicy.DATASET_SIZE:
        raw = {c: float(v) for c, v in claims.items() if v is not None}
    else:
        raw = _registered(claims, registered)
    return capped(raw, cap)


def capped(weights: Mapping[str, float], cap: float = 0.5) -> dict[str, float]:
    """``weights`` normalised, then water-filled so that none exceeds ``max(cap, 1 / N)``.

    Clamped clients get exactly the limit; the others share the rest in proportion to
    their weights. Each pass clamps at least one more client, so it ends within N passes.
    """
    names = list(weights)
    values = [float(weights[c]) for c in names]
    if not names or not all(_positive(v) for v in values):
        raise AggregationError(f"weights must be finite and > 0, got {dict(weights)!r}")
    limit = max(_cap(cap), 1.0 / len(names))
    clamped: set[int] = set()
    while True:
        free = [i for i in range(len(values)) if i not in clamped]
        share = 1.0 - limit * len(clamped)
        free_total = math.fsum(values[i] for i in free)
        out = [limit if i in clamped else share * values[i] / free_total for i in range(len(values))]
        over = [i for i in free if out[i] > limit]
        if not over or len(clamped) + len(over) == len(values):
            if over:  # every client at the limit: that is 1/N each
                out = [limit] * len(values)
            break
        clamped.update(over)
    # rounding may leave a free share an ulp above the limit; the cap is a promise
    return {c: min(w, limit) for c, w in zip(names, out, strict=True)}


def _registered(claims: Mapping[str, float | None], registered: Mapping[str, float] | None) -> dict[str, float]:
    table = registered or {}
    missing = sorted(c for c in claims if c not in table)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(
            "weight policy 'registered' needs a registered weight or dataset size for every client; none for"
            f" {', '.join(map(repr, missing[:5]))}{more} (client add --weight/--dataset-size)"
        )
    out = {}
    for c in claims:
        value = table[c]
        if not _positive(value):
            raise ConfigError(f"client {c!r} has registered weight {value!r}; it must be finite and > 0")
        out[c] = float(value)
    return out


def _cap(cap: float) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (0 < cap <= 1):
        raise ConfigError(f"the weight cap must be a number in (0, 1], got {cap!r}")
    return float(cap)


def _positive(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 0


def split_among_terms(client_weights: Mapping[str, float], owners: Mapping[str, str]) -> dict[str, float]:
    """Each term's weight: its client's weight shared evenly among that client's terms (``owners``: term ->
    client). A client that contributes several deltas to one flush (``--max-per-client-per-flush``) weighs as
    much as one that contributes once: being fast buys no larger share of a version."""
    counts: dict[str, int] = {}
    for client in owners.values():
        counts[client] = counts.get(client, 0) + 1
    missing = sorted(set(counts) - set(client_weights))
    if missing:
        raise AggregationError(f"no weight for client(s) {missing}")
    return {term: client_weights[client] / counts[client] for term, client in owners.items()}


def client_claims(claims: Mapping[str, float | None], owners: Mapping[str, str]) -> dict[str, float | None]:
    """One dataset-size claim per client from its terms' claims (``owners``: term -> client): their mean, or
    None when any term claims none."""
    by_client: dict[str, list[float | None]] = {}
    for term, client in owners.items():
        by_client.setdefault(client, []).append(claims[term])
    out: dict[str, float | None] = {}
    for client, values in by_client.items():
        known = [v for v in values if v is not None]
        out[client] = sum(known) / len(known) if len(known) == len(values) else None
    return out
