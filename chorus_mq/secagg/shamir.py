"""Shamir secret sharing over GF(p), p = 2^521 - 1 (a Mersenne prime), written here on purpose.

A secret of up to 64 bytes is one field element (2^512 < p), so a 32-byte seed or X25519
private key is shared as a single polynomial of degree T-1 with random coefficients. Longer
secrets are split into 64-byte chunks, each its own polynomial, sharing the x-coordinate.
Any T shares reconstruct; fewer are refused (and carry no information about the secret).
"""

from __future__ import annotations

import itertools
import secrets as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, SecAggError

PRIME = 2**521 - 1
CHUNK = 64  # bytes of secret per field element
_Y_BYTES = 66  # ceil(521 / 8)
_X_BYTES = 2
MAX_X = 2 ** (8 * _X_BYTES) - 1
#: how many T-subsets reconstruct_verified tries before giving up (a few bad shares among many)
MAX_SUBSETS = 5000


@dataclass(frozen=True)
class Share:
    """One holder's share: the x-coordinate (1..65535) and one y per 64-byte chunk of the secret."""

    x: int
    ys: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_X:
            raise SecAggError(f"share x-coordinate must be in 1..{MAX_X}, got {self.x}")
        if not self.ys or any(not 0 <= y < PRIME for y in self.ys):
            raise SecAggError("share values must be field elements")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_BYTES, "big") + b"".join(y.to_bytes(_Y_BYTES, "big") for y in self.ys)

    @classmethod
    def from_bytes(cls, raw: bytes, secret_len: int) -> Share:
        """Parse a share of a ``secret_len``-byte secret; wrong length or values are :class:`SecAggError`."""
        if len(raw) != share_size(secret_len):
            raise SecAggError(
                f"a share of a {secret_len}-byte secret is {share_size(secret_len)} bytes, got {len(raw)}"
            )
        x = int.from_bytes(raw[:_X_BYTES], "big")
        body = raw[_X_BYTES:]
        ys = tuple(int.from_bytes(body[i : i + _Y_BYTES], "big") for i in range(0, len(body), _Y_BYTES))
        return cls(x, ys)


def _chunks(secret_len: int) -> int:
    return max(1, -(-secret_len // CHUNK))


def share_size(secret_len: int) -> int:
    """Bytes of one serialised share of a ``secret_len``-byte secret."""
    return _X_BYTES + _Y_BYTES * _chunks(secret_len)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the x-coordinates ``xs`` (distinct, 1..65535); any ``threshold`` reconstruct."""
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"threshold must be in 1..{len(xs)} (the number of holders), got {threshold}")
    if len(set(xs)) != len(xs) or any(not 1 <= x <= MAX_X for x in xs):
        raise ConfigError(f"share x-coordinates must be distinct and in 1..{MAX_X}")
    if not secret:
        raise ConfigError("cannot share an empty secret")
    polys = []
    for i in range(0, len(secret), CHUNK):
        constant = int.from_bytes(secret[i : i + CHUNK], "big")
        polys.append([constant] + [_random.randbelow(PRIME) for _ in range(threshold - 1)])
    return [Share(x, tuple(_evaluate(p, x) for p in polys)) for x in xs]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def reconstruct(shares: Sequence[Share], threshold: int, secret_len: int) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret shared at threshold {threshold}")
    use = list(shares)[:threshold]
    xs = [s.x for s in use]
    if len(set(xs)) != len(xs):
        raise SecAggError("two shares have the same x-coordinate")
    n_chunks = _chunks(secret_len)
    if any(len(s.ys) != n_chunks for s in use):
        raise SecAggError(f"shares of a {secret_len}-byte secret have {n_chunks} values each")
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j)
    basis = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        basis.append(num * pow(den, -1, PRIME) % PRIME)
    out = bytearray()
    for c in range(n_chunks):
        value = sum(b * s.ys[c] for b, s in zip(basis, use, strict=True)) % PRIME
        width = min(CHUNK, secret_len - c * CHUNK)
        if value >= 2 ** (8 * width):
            raise SecAggError("the shares do not reconstruct a secret of the expected length")
        out += value.to_bytes(width, "big")
    return bytes(out)


def reconstruct_verified(
    shares: Sequence[Share], threshold: int, secret_len: int, check: Callable[[bytes], bool]
) -> bytes:
    """The secret that passes ``check``, trying T-subsets so a few wrong shares cannot poison it."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret shared at threshold {threshold}")
    for tried, subset in enumerate(itertools.combinations(shares, threshold)):
        if tried >= MAX_SUBSETS:
            break
        try:
            secret = reconstruct(subset, threshold, secret_len)
        except SecAggError:
            continue
        if check(secret):
            return secret
    raise SecAggError(f"no {threshold} of the {len(shares)} shares reconstruct a secret that matches its commitment")
