"""The masked vector of a secure round: which tensors, in which order, flattened into one float vector.

A linear strategy's aggregate is the weighted mean of one trained tensor per module (the round's
trainable factor: ``lora_B`` of shape (d_out, r), ``lora_A`` of shape (r, d_in), or Fed-SB's ``lora_R``
of shape (r, r) between the frozen frame, never the frame itself) and of each task head tensor.
Every party lays them out the same way: module factors by module name, then head tensors by key,
each flattened row-major. The shapes are the published global's, so a client
whose trained factor has another shape cannot be masked in (its input has the wrong length).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..names import Factor


def _trained_shape(shapes: tuple[tuple[int, ...], tuple[int, ...]], trained: Factor) -> tuple[int, ...]:
    """The trained tensor's shape from the module's published (A's shape, B's shape): A's, B's, or (r, r) for R."""
    a, b = shapes
    if trained == Factor.LORA_A:
        return tuple(a)
    if trained == Factor.LORA_B:
        return tuple(b)
    if trained == Factor.LORA_R:
        return (a[0], a[0])
    raise ConfigError(f"a secure round masks lora_A, lora_B or lora_R, not {trained}")


@dataclass(frozen=True)
class MaskedLayout:
    """``entries``: (tensor key, shape) in vector order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def for_round(
        cls,
        modules: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
        extras: Mapping[str, tuple[int, ...]],
        trained: Factor,
    ) -> MaskedLayout:
        """From the published global: module -> (A's shape, B's shape), head key -> shape, and the trained factor."""
        entries = [(f"{m}.{trained}.weight", _trained_shape(modules[m], trained)) for m in sorted(modules)]
        entries += [(k, tuple(extras[k])) for k in sorted(extras)]
        if not entries:
            raise ConfigError("a secure round needs at least one trained tensor")
        return cls(tuple(entries))

    @property
    def length(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def spans(self) -> dict[str, tuple[int, int]]:
        """Tensor key -> its [start, end) in the vector (what one shard of a sharded unmask reads)."""
        out, at = {}, 0
        for key, shape in self.entries:
            n = math.prod(shape)
            out[key] = (at, at + n)
            at += n
        return out

    def flatten(self, tensors: Mapping[str, Any]) -> npt.NDArray[np.float64]:
        """The tensors (numpy or torch) as one float64 vector; ConfigError naming a missing or misshapen one."""
        parts = []
        for key, shape in self.entries:
            if key not in tensors:
                raise ConfigError(f"the secure round's input needs {key!r}, which the adapter does not hold")
            t = tensors[key]
            v = np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)
            if tuple(v.shape) != shape:
                raise ConfigError(f"{key!r} has shape {list(v.shape)}; this round publishes it as {list(shape)}")
            parts.append(v.reshape(-1))
        return np.concatenate(parts)

    def unflatten(self, vector: npt.ArrayLike) -> dict[str, npt.NDArray[np.float64]]:
        v = np.asarray(vector, dtype=np.float64).reshape(-1)
        if v.shape[0] != self.length:
            raise ConfigError(f"a vector of {v.shape[0]} elements is not this layout's {self.length}")
        out, at = {}, 0
        for key, shape in self.entries:
            n = math.prod(shape)
            out[key] = v[at : at + n].reshape(shape)
            at += n
        return out

    def to_list(self) -> list[list[Any]]:
        return [[key, list(shape)] for key, shape in self.entries]

    @classmethod
    def from_list(cls, raw: Any) -> MaskedLayout:
        try:
            return cls(tuple((str(k), tuple(int(d) for d in s)) for k, s in raw))
        except (TypeError, ValueError):
            raise ConfigError("a secure round's layout must be a list of [key, shape]") from None
