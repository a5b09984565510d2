"""Utility of client-level DP on a synthetic federation: sound mechanisms vs noising the factors.

A frozen, shared A with orthonormal rows (FFA-LoRA) per module, so all three
mechanisms apply to the same clients:

  (a) dense  - Gaussian noise on the weight-space aggregate (any adapter);
  (b) ffa    - Gaussian noise on the aggregated B only (frozen orthonormal A);
  (c) broken - the classic sigma = sqrt(2 ln(1.25/delta)) Delta/eps on both A and B,
               as the old HTTP tool did (invalid for eps >= 1; cross term Z_B Z_A).

Adjacency add/remove one client, fixed weights 1/N, adapter-wide clip C = the
median client norm, so Delta = C/N. Errors are relative to the non-private,
unclipped aggregate; "clip" is the error of clipping alone (no noise).
Run: python benchmarks/dp_utility.py [--clients 10,100,1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import torch

from chorus_mq.aggregation.dp import (
    PrivacyAccountant,
    aggregate_sensitivity,
    analytic_gaussian_sigma,
    gaussian_noise_dense,
    noise_B,
    noise_for_budget,
)
from chorus_mq.aggregation.robust import RobustPolicy, screen

F64 = torch.float64


def federation(n, n_modules, dim, rank, spread, *, g):
    """Per module a frozen orthonormal A0 and client B_i = B* + spread * noise."""
    mods = []
    for _ in range(n_modules):
        A0 = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=F64))[0].T.contiguous()
        B_star = torch.randn(dim, rank, generator=g, dtype=F64)
        Bs = B_star + spread * torch.randn(n, dim, rank, generator=g, dtype=F64)
        mods.append((A0, Bs))
    return mods


def rel(parts, ref) -> float:
    num = sum(((p - r) ** 2).sum().item() for p, r in zip(parts, ref, strict=False))
    return math.sqrt(num / sum((r**2).sum().item() for r in ref))


def one_round_errors(mods, scaling, clip, sigma, sigma_classic, *, g):
    """Relative errors of (clip only, a, b, c) for one release with noise std sigma."""
    exact, clipped, dense, ffa, broken = [], [], [], [], []
    for A0, Bs in mods:
        B_bar = Bs.mean(0)
        B_clip = (clip[:, None, None] * Bs).mean(0)
        exact.append(scaling * B_bar @ A0)
        clipped.append(scaling * B_clip @ A0)
        d_out, d_in = clipped[-1].shape
        dense.append(clipped[-1] + gaussian_noise_dense(d_out, d_in, sigma, g, F64))
        ffa.append(scaling * noise_B(B_clip, A0, sigma, scaling, g) @ A0)
        B_noisy = B_clip + sigma_classic * torch.randn(B_clip.shape, generator=g, dtype=F64)
        A_noisy = A0 + sigma_classic * torch.randn(A0.shape, generator=g, dtype=F64)
        broken.append(scaling * B_noisy @ A_noisy)
    return [rel(x, exact) for x in (clipped, dense, ffa, broken)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", default="0.5,1,2,8")
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--modules", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    eps_list = [float(x) for x in args.eps.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    scaling = 16 / args.rank  # lora_alpha = 16
    print(f"{args.modules} modules {args.dim}x{args.dim}, r={args.rank}, delta={args.delta:g}, "
          "add/remove-one adjacency, weights 1/N, clip C = median client norm")  # fmt: skip
    head = (f"{'rounds':>6} {'eps':>5} {'N':>5} {'z':>8} {'eps spent':>9} {'eps RDP':>8} "
            f"{'clip':>8} {'(a) dense':>10} {'(b) ffa':>10} {'(c) broken':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for rounds in (1, args.rounds):
        for eps in eps_list:
            for n in (int(x) for x in args.clients.split(",")):
                mods = federation(n, args.modules, args.dim, args.rank, 0.5, g=g)
                clients = [[(A0, Bs[i], scaling) for A0, Bs in mods] for i in range(n)]
                C = screen(clients, RobustPolicy(detect_outliers=False)).stats["norm"].median().item()
                clip = screen(clients, RobustPolicy(detect_outliers=False, clip_norm=C)).clip_factors[:, 0]
                sens = aggregate_sensitivity(C, [1.0 / n] * n)
                if rounds == 1:
                    z = analytic_gaussian_sigma(eps, args.delta)
                else:
                    z = noise_for_budget(eps, args.delta, rounds)
                acc = PrivacyAccountant()
                acc.spend(z, rounds)
                # the broken tool split the budget naively: eps/R and delta/R per round
                classic = math.sqrt(2 * math.log(1.25 * rounds / args.delta)) * sens / (eps / rounds)
                errs = one_round_errors(mods, scaling, clip.to(F64), z * sens, classic, g=g)
                print(f"{rounds:>6} {eps:>5g} {n:>5} {z:>8.3f} {acc.epsilon(args.delta):>9.4f} "
                      f"{acc.epsilon_rdp(args.delta):>8.4f} {errs[0]:>8.3g} {errs[1]:>10.3g} "
                      f"{errs[2]:>10.3g} {errs[3]:>11.3g}")  # fmt: skip
    print("errors: ||DP aggregate - non-private aggregate||_F / ||non-private aggregate||_F, one round")


if __name__ == "__main__":
    main()
