"""Differential privacy with secure aggregation: clients clip, the workers noise the unmasked sum.

The mechanism is the one ``aggregation.dp`` analyses (add/remove one client, fixed public
weights w_i, L2 sensitivity ``C * max w``): each client clips its whole flattened trained factor
to L2 norm C *before* encoding (the workers cannot, they never see it), scales it by its published
weight, and masks it; the workers add N(0, sigma^2), sigma = z * C * max w, to each element of
the unmasked sum. For FFA-LoRA with a frozen A of orthonormal rows, ``||s B A||_F = s ||B||_F``,
so clipping the flattened ``s B`` is clipping the update (``aggregation.dp.noise_B``'s argument).
The accountant (``aggregation.dp.PrivacyAccountant``) spends z once per round as for any DP round.

Noise comes from a generator seeded by the workers' secret noise key per (federation, round,
shard), so a re-run of a shard releases the same noise (``aggregation.dp.noise_generator``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from ..aggregation.dp import aggregate_sensitivity, gaussian_noise_dense
from ..errors import ConfigError
from .encoding import Encoding


def clip_and_weight(
    update: npt.ArrayLike, *, clip_norm: float, weight: float, encoding: Encoding | None = None
) -> npt.NDArray[np.float32]:
    """A client's input: its flattened update clipped to L2 norm ``clip_norm``, times its published ``weight``.

    Refuses a clip and weight whose product exceeds the encoding range: every element of the
    result is at most ``clip_norm * weight`` in magnitude, so the input then always encodes.
    """
    encoding = encoding or Encoding()
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"clip_norm must be a finite number above 0, got {clip_norm!r}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"the weight must be a finite number >= 0, got {weight!r}")
    if clip_norm * weight > encoding.clip:
        raise ConfigError(f"clip_norm * weight = {clip_norm * weight:g} exceeds the encoding range {encoding.clip:g}")
    v = np.asarray(update, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise ConfigError("the update has NaN or infinite values")
    norm = float(np.linalg.norm(v))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (v * (factor * weight)).astype(np.float32)


def noise_sigma(*, clip_norm: float, weights: Sequence[float], noise_multiplier: float) -> float:
    """sigma = z * C * max(w): the Gaussian mechanism on the weighted sum of clipped updates."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return noise_multiplier * aggregate_sensitivity(clip_norm, weights)


def noise_sum(total: npt.ArrayLike, sigma: float, generator: torch.Generator) -> npt.NDArray[np.float64]:
    """The unmasked sum plus N(0, sigma^2) per element (what the workers publish for a DP secure round)."""
    t = np.asarray(total, dtype=np.float64).reshape(-1)
    noise: npt.NDArray[np.float64] = (
        gaussian_noise_dense(1, t.shape[0], sigma, generator, torch.float64).reshape(-1).numpy()
    )
    return t + noise
