"""SCAFFOLD's server step written out by hand in float64 (DESIGN.md section 1), for the tests to compare with."""

from __future__ import annotations

import torch

from chorus_mq.aggregation.variates import gauge_rotation

_A, _B = ".lora_A.weight", ".lora_B.weight"


def items(keys):
    """An adapter's items: each module's (A, B) key pair, and every other tensor (a head part) alone."""
    modules = sorted(k.removesuffix(_A) for k in keys if k.endswith(_A))
    others = sorted(k for k in keys if not k.endswith((_A, _B)))
    return [[m + _A, m + _B] for m in modules] + [[k] for k in others]


def server_step(x, server, uploads, lr_sums, weights, new_adapter, *, fraction=1.0, k=10.0):
    """c' = c + f Σ wᵢ κᵢ ((x - yᵢ)/lrᵢ - c) per item, κᵢ = min(1, k · lower median / ‖Δcᵢ‖); each module's
    pair then carried into ``new_adapter``'s basis by G = polar(A_new A_xᵀ): (G c_A, c_B Gᵀ)."""
    out = {}
    for keys in items(x):
        c = [server[key].double() if key in server else torch.zeros_like(x[key].double()) for key in keys]
        deltas = [
            [(x[key].double() - y[key].double()) / lr - cj for key, cj in zip(keys, c, strict=True)]
            for y, lr in zip(uploads, lr_sums, strict=True)
        ]
        norms = [float(sum((d * d).sum() for d in ds)) ** 0.5 for ds in deltas]
        med = sorted(norms)[(len(norms) - 1) // 2]
        total = [cj.clone() for cj in c]
        for ds, w, n in zip(deltas, weights, norms, strict=True):
            kappa = 1.0 if n <= k * med else k * med / n
            total = [t + fraction * w * kappa * d for t, d in zip(total, ds, strict=True)]
        if len(keys) == 2:
            g = gauge_rotation(new_adapter[keys[0]], x[keys[0]])
            total = [g @ total[0], total[1] @ g.T]
        out.update(dict(zip(keys, total, strict=True)))
    return out
