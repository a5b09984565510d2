"""A buffered federation's staleness discount ``g(τ)`` (``--staleness-weight``), torch-free.

The config validates it at ``federation create``; the flush math (:mod:`chorus_mq.aggregation.buffered`)
weighs each delta with it. DESIGN.md section 1, "Buffered flushes".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AggregationError, ConfigError
from .names import StalenessWeight


@dataclass(frozen=True)
class StalenessRule:
    """``g(τ)``: constant (1), poly (``(1 + τ)^(−a)``) or FedBuff's hinge (1 up to ``b``, then
    ``1 / (a (τ − b) + 1)``)."""

    kind: StalenessWeight = StalenessWeight.CONSTANT
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StalenessWeight(self.kind))
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"staleness weight parameter {name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> StalenessRule:
        """``constant``, ``poly:A`` or ``hinge:A,B`` (``--staleness-weight``); ConfigError otherwise."""
        kind, _, params = str(text).strip().partition(":")
        usage = "use constant, poly:A (e.g. poly:0.5) or hinge:A,B (e.g. hinge:10,4)"
        try:
            rule = StalenessWeight(kind)
            values = [float(p) for p in params.split(",")] if params else []
        except ValueError:
            raise ConfigError(f"staleness weight {text!r} is not understood; {usage}") from None
        wanted = {StalenessWeight.CONSTANT: 0, StalenessWeight.POLY: 1, StalenessWeight.HINGE: 2}[rule]
        if len(values) != wanted:
            raise ConfigError(f"staleness weight {text!r} takes {wanted} parameter(s); {usage}")
        return cls(rule, *values)

    def __str__(self) -> str:
        if self.kind == StalenessWeight.CONSTANT:
            return "constant"
        if self.kind == StalenessWeight.POLY:
            return f"poly:{self.a!r}"
        return f"hinge:{self.a!r},{self.b!r}"

    def g(self, tau: int) -> float:
        """The discount of a delta ``tau`` versions stale (``tau >= 0``)."""
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise AggregationError(f"staleness must be an int >= 0, got {tau!r}")
        if self.kind == StalenessWeight.CONSTANT:
            return 1.0
        if self.kind == StalenessWeight.POLY:
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
