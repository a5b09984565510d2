"""A float64 oracle of a federation under a server optimiser: Reddi et al.'s steps in numpy, state carried.

It tracks, per module, ``x_t − W_0`` (the published model minus the original base: the cumulative
correction plus the adapter's product) and each head, from what the clients uploaded and the
adapter they started from (the previous pulled round), and compares a pulled directory with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from chorus_mq.adapters import LoraSpec
from chorus_mq.names import ServerOptimizer
from chorus_mq.pulled import iter_correction

PEFT_PREFIX = "base_model.model."


class Steps:
    """One item's server optimiser written out in numpy float64 (state starts at zero)."""

    def __init__(self, optimizer: str, lr: float, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3):
        self.optimizer, self.lr, self.momentum = ServerOptimizer(optimizer), lr, momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: np.ndarray | float = 0.0
        self.v: np.ndarray | float = 0.0

    def __call__(self, delta: np.ndarray) -> np.ndarray:
        if self.optimizer == ServerOptimizer.FEDAVGM:
            self.v = self.momentum * self.v + delta
            return self.lr * self.v
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        sq = delta**2
        if self.optimizer == ServerOptimizer.FEDADAM:
            self.v = self.beta2 * self.v + (1 - self.beta2) * sq
        else:
            self.v = self.v - (1 - self.beta2) * sq * np.sign(self.v - sq)
        return self.lr * self.m / (np.sqrt(self.v) + self.tau)


def published(out: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A pulled directory's per module ``correction + s·B·A`` and adapter product alone, and its other
    tensors (heads), in float64."""
    spec = LoraSpec.from_peft_config(json.loads((out / "adapter_config.json").read_text()))
    tensors = load_file(out / "adapter_model.safetensors")
    products, heads = {}, {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            B = tensors[f"{module}.lora_B.weight"].double().numpy()
            products[module] = spec.scaling(module, t.shape[0]) * B @ t.double().numpy()
        elif not key.endswith(".lora_B.weight"):
            heads[key] = t.double().numpy()
    total = {m: p.copy() for m, p in products.items()}
    for module, res in iter_correction(out):
        total[module] = total.get(module, 0.0) + res.to_dense().double().numpy()
    return total, products, heads


class FederationOracle:
    """``x_t − W_0`` per module and each head, stepped from the uploads of each round."""

    def __init__(self, optimizer: str, lr: float, *, start: Path | None = None, **hyper: float):
        self.make = lambda: Steps(optimizer, lr, **hyper)
        self.steps: dict[str, Steps] = {}
        self.x: dict[str, np.ndarray] = {}
        self.heads: dict[str, np.ndarray] = {}
        if start is not None:  # round 0: the initial adapter is the published global
            self.x, _, self.heads = published(start)

    def round(self, uploads: list[tuple[float, dict, dict]], previous: Path | None, *, scaling) -> None:
        """Step with ``uploads`` [(weight, {module path: (A, B)}, {head: tensor})] (weights normalised here) from
        the adapter in pulled directory ``previous`` (None: no previous adapter); ``scaling(rank)`` is s_i."""
        total = sum(w for w, _, _ in uploads)
        start_products, start_heads = ({}, {}) if previous is None else published(previous)[1:]
        for name in sorted({m for _, f, _ in uploads for m in f}):
            aggregate = sum(
                w / total * scaling(f[name][0].shape[0]) * (f[name][1].double().numpy() @ f[name][0].double().numpy())
                for w, f, _ in uploads
            )
            module = f"{PEFT_PREFIX}{name}"  # as the published adapter names it
            old = start_products.get(module, 0.0)
            step = self.steps.setdefault(module, self.make())
            self.x[module] = self.x.get(module, 0.0) + step(aggregate - old)
        for head in sorted({h for _, _, hs in uploads for h in hs}):
            mean = sum(w / total * hs[head].double().numpy() for w, _, hs in uploads)
            if head not in start_heads:  # no previous head: taken as it is, the optimiser starts next round
                self.heads[head] = mean
                self.steps[head] = self.make()
                continue
            self.heads[head] = start_heads[head] + self.steps.setdefault(head, self.make())(mean - start_heads[head])

    def worst_error(self, out: Path) -> float:
        """The largest relative Frobenius error over modules and heads of pulled directory ``out``."""
        total, _, heads = published(out)
        assert sorted(total) == sorted(self.x), (sorted(total), sorted(self.x))
        assert sorted(heads) == sorted(self.heads)
        errors = [np.linalg.norm(total[m] - x) / np.linalg.norm(x) for m, x in self.x.items()]
        errors += [np.linalg.norm(heads[h] - x) / np.linalg.norm(x) for h, x in self.heads.items()]
        return float(max(errors))
