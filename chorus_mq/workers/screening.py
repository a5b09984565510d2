"""Robust screening and differential privacy for one round, streamed module by module.

Screening reads every module once to build r x r Gram statistics (never a dense update),
decides per-client weights, exclusions and clip factors; aggregation then reads the
modules again. The DP release is the Gaussian mechanism on the aggregate update with
fixed public weights 1/quorum and an adapter-wide clip, so it is calibrated exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..adapters import DeltaFile
from ..aggregation import ClientUpdate, ModuleResult, Residual, aggregate_module
from ..aggregation.dp import aggregate_sensitivity, gaussian_noise_dense, noise_B, orthonormal_rows
from ..aggregation.robust import GramAccumulator, RobustPolicy, clip_update
from ..state.rounds import FederationConfig


def client_update(delta: DeltaFile, module: str, weight: float) -> ClientUpdate:
    A, B = delta.factors(module)
    return ClientUpdate(A=A, B=B, scaling=delta.spec.scaling(module, A.shape[0]), weight=weight)


@dataclass
class Screening:
    """Who is aggregated, with which weight, and by how much each module is clipped."""

    weights: dict[str, float]
    excluded: dict[str, str] = field(default_factory=dict)
    clip: dict[tuple[str, str], float] = field(default_factory=dict)

    def apply(self, client: str, module: str, update: ClientUpdate) -> ClientUpdate:
        factor = self.clip.get((client, module), 1.0)
        return update if factor == 1.0 else clip_update(update, factor)


def screen_round(deltas: dict[str, DeltaFile], weights: dict[str, float], config: FederationConfig) -> Screening:
    """Run the federation's robust policy over every module; memory stays one module x N clients."""
    if not config.screening:
        return Screening(dict(weights))
    clients = list(deltas)
    policy = RobustPolicy(detect_outliers=bool(config.screen_outliers), z_threshold=config.outlier_z,
                          clip_norm=config.clip_norm or None, aggregate=config.robust_aggregate, trim=config.trim)
    acc = GramAccumulator(len(clients), policy)
    for name in sorted({m for d in deltas.values() for m in d.modules}):
        acc.add(name, [client_update(d, name, 1.0) if name in d.modules else None for d in deltas.values()])
    res = acc.screen(weights=[weights[c] for c in clients])
    kept = set(res.kept)
    screening = Screening(weights={c: float(res.weights[i]) for i, c in enumerate(clients) if i in kept},
                          excluded={clients[i]: reason for i, reason in res.excluded.items()})
    for i, c in enumerate(clients):
        for m, name in enumerate(res.modules):
            factor = float(res.clip_factors[i, m])
            if i in kept and factor != 1.0:
                screening.clip[(c, name)] = factor
    return screening


def noise_generator(noise_key: str, federation: str, r: int, module: str) -> torch.Generator:
    """Deterministic per (federation, round, module) but secret: a re-run releases the same noise,
    so a duplicate aggregation never leaves two independent noisy copies to average."""
    digest = hashlib.sha256(f"{noise_key}|{federation}|{r}|{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def dp_release(updates: list[ClientUpdate], *, quorum: int, clip_norm: float, noise_multiplier: float,
               generator: torch.Generator, out_rank: int | None = None) -> ModuleResult:
    """Release ``sum_i U_i / quorum + N(0, sigma^2)`` with sigma = z * C / quorum.

    When every client shares one frozen A with orthonormal rows (FFA-LoRA), the noise
    goes on B alone (d_out x r); otherwise it is dense per module (d_out x d_in) and the
    released adapter is its best rank-r approximation, with the rest as a dense residual.
    """
    sigma = noise_multiplier * aggregate_sensitivity(clip_norm, [1.0 / quorum] * quorum)
    A0 = updates[0].A
    if all(torch.equal(u.A, A0) for u in updates) and orthonormal_rows(A0):
        b_sum = sum((u.scaling / quorum) * u.B.double() for u in updates).float()
        return ModuleResult(A=A0.float(), B=noise_B(b_sum, A0.float(), sigma, 1.0, generator), scaling=1.0,
                            residual=None)
    stacked = aggregate_module([ClientUpdate(u.A, u.B, u.scaling, 1.0) for u in updates], "stack")
    # the engine normalised weights over the clients present; the mechanism fixes 1/quorum
    scale = stacked.scaling * len(updates) / quorum
    dense = (stacked.B.double() @ stacked.A.double() * scale).float()
    dense += gaussian_noise_dense(dense.shape[0], dense.shape[1], sigma, generator)
    rank = out_rank or max(u.A.shape[0] for u in updates)
    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    root = S[:rank].sqrt()
    left, right = (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()
    return ModuleResult(A=right, B=left, scaling=1.0, residual=Residual(dense=dense - left @ right))
