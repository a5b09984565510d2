"""What a secure round publishes when it opens, so that every party derives the same :class:`SecAggParams`.

Stored in the round's secagg hash (field ``params``) and carried by the ``secagg_phase`` event of
the advertise phase: the cohort, K, T, the graph seed, each client's weight (it pre-scales its
input by it), the trained factor, the layout of the masked vector and the round whose published
global the clients start from (its frozen factor is what they keep).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..names import Factor
from .dp import clip_and_weight, noise_sigma
from .params import SecAggParams
from .vector import MaskedLayout


def graph_seed(federation: str, round_: int, cohort: Sequence[str]) -> bytes:
    """The neighbour graph's public seed: fixed by the federation, the round and its cohort (nobody picks it)."""
    return hashlib.sha256(f"chorus-secagg-graph|{federation}|{round_}|{','.join(sorted(cohort))}".encode()).digest()


@dataclass(frozen=True)
class RoundPublic:
    cohort: tuple[str, ...]
    neighbours: int
    threshold: int
    graph_seed: bytes
    weights: Mapping[str, float]
    trainable: Factor
    layout: MaskedLayout
    start: int
    #: each client clips its flattened input to this L2 norm before weighting it (0: no clipping)
    clip_norm: float = 0.0
    #: DP: the workers add N(0, (z * clip_norm * max weight)^2) to each element of the unmasked sum (0: off)
    noise_multiplier: float = 0.0

    def client_input(self, client: str, flat: Any) -> Any:
        """What ``client`` masks: its flattened input, clipped to ``clip_norm`` (when set), times its weight."""
        if self.clip_norm:
            return clip_and_weight(flat, clip_norm=self.clip_norm, weight=self.weights[client])
        return flat * self.weights[client]

    def sigma(self) -> float:
        """The noise the workers add to each element of the sum (0 without DP)."""
        if not self.noise_multiplier:
            return 0.0
        return noise_sigma(
            clip_norm=self.clip_norm, weights=list(self.weights.values()), noise_multiplier=self.noise_multiplier
        )

    def params(self, federation: str, round_: int) -> SecAggParams:
        return SecAggParams(
            federation=federation,
            round=round_,
            cohort=self.cohort,
            length=self.layout.length,
            graph_seed=self.graph_seed,
            neighbour_count=self.neighbours,
            threshold=self.threshold,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cohort": list(self.cohort),
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "graph_seed": self.graph_seed.hex(),
            "weights": dict(self.weights),
            "trainable": str(self.trainable),
            "layout": self.layout.to_list(),
            "length": self.layout.length,
            "start": self.start,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundPublic:
        try:
            return cls(
                cohort=tuple(str(c) for c in d["cohort"]),
                neighbours=int(d["neighbours"]),
                threshold=int(d["threshold"]),
                graph_seed=bytes.fromhex(d["graph_seed"]),
                weights={str(c): float(w) for c, w in d["weights"].items()},
                trainable=Factor(d["trainable"]),
                layout=MaskedLayout.from_list(d["layout"]),
                start=int(d["start"]),
                clip_norm=float(d.get("clip_norm", 0.0)),
                noise_multiplier=float(d.get("noise_multiplier", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"a secure round's published parameters are malformed: {exc}") from None
