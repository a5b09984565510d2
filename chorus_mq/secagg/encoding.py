"""Fixed-point encoding of float vectors into Z/2^64, where masks are added and cancel.

Why these numbers (defaults):

- modulus 2^64: numpy's uint64 arithmetic wraps modulo 2^64 by itself, so masking is one
  vectorised add per mask, and the ChaCha20 keystream is read directly as uint64 words.
- scale 2^40: a float32 value with |x| >= 2^-16 is an integer multiple of 2^-40 after scaling,
  so it encodes *exactly*; smaller values round to the nearest 2^-40 (error <= 2^-41 each).
  The decoded sum of N inputs is within N * 2^-41 per element of the float64 sum of the
  unquantised inputs, far below 1e-5 relative for any sum whose norm is above ~1e-6 per element.
- clip range [-64, 64]: clients pre-scale their update by their weight (weights sum to 1), so a
  LoRA factor entry above 64 is already far outside what a training step produces. The signed
  sum of N encoded inputs is at most N * 64 * 2^40 = N * 2^46 in magnitude and decodes uniquely
  while that is below 2^63: N <= 2^17 - 1 = 131071 clients (``max_inputs``).

Inputs outside the range are refused (``on_range="refuse"``, the default: a client learns of its
own bug) or clipped elementwise to it (``on_range="clip"``); NaN and infinities are always refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, SecAggError

U64 = np.dtype("<u8")
MODULUS_BITS = 64
DEFAULT_SCALE_BITS = 40
DEFAULT_CLIP = 64.0

Encoded = npt.NDArray[np.uint64]
Floats = npt.NDArray[np.floating]


@dataclass(frozen=True)
class Encoding:
    """How a round encodes inputs: values in [-clip, clip], scaled by 2^scale_bits, modulo 2^64."""

    scale_bits: int = DEFAULT_SCALE_BITS
    clip: float = DEFAULT_CLIP
    on_range: Literal["refuse", "clip"] = "refuse"

    def __post_init__(self) -> None:
        if not 0 <= self.scale_bits <= 52:
            raise ConfigError(f"encoding scale bits must be in [0, 52], got {self.scale_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"encoding clip must be a finite number above 0, got {self.clip!r}")
        if self.on_range not in ("refuse", "clip"):
            raise ConfigError(f"on_range must be 'refuse' or 'clip', got {self.on_range!r}")
        if self.max_inputs < 1:
            raise ConfigError(f"clip {self.clip} at scale 2^{self.scale_bits} leaves no room in 64 bits")

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def max_inputs(self) -> int:
        """How many encoded inputs can be summed before the signed sum could wrap (2^63 - 1 bound)."""
        return int((2**63 - 1) // math.ceil(self.clip * self.scale))

    def encode(self, x: npt.ArrayLike) -> Encoded:
        """One client's (pre-weighted) input as uint64 words; refuses or clips values out of range."""
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise SecAggError("secure-aggregation input has NaN or infinite values")
        peak = float(np.abs(v).max(initial=0.0))
        if peak > self.clip:
            if self.on_range == "refuse":
                raise SecAggError(
                    f"secure-aggregation input has |x| = {peak:.6g} above the encoding range {self.clip:g}: "
                    "clip the update on the client (or scale it by its weight) first"
                )
            v = np.clip(v, -self.clip, self.clip)
        # x * 2^s is exact in float64 and rint is exact below 2^53; the int64 -> uint64 view is mod 2^64
        return np.rint(v * self.scale).astype(np.int64).view(U64)

    def decode_sum(self, total: Encoded, n_inputs: int) -> npt.NDArray[np.float64]:
        """The float64 value of a sum of ``n_inputs`` encoded inputs (its signed residue / scale)."""
        if not 0 < n_inputs <= self.max_inputs:
            raise SecAggError(f"cannot decode a sum of {n_inputs} inputs: this encoding holds 1..{self.max_inputs}")
        return np.asarray(total, dtype=U64).view(np.int64).astype(np.float64) / self.scale

    def error_bound(self, n_inputs: int) -> float:
        """Largest per-element difference between a decoded sum and the float64 sum of the clipped inputs."""
        return n_inputs * 0.5 / self.scale
