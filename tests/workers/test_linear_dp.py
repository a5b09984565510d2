"""Server-side DP for the linear strategies through the worker path (eager tasks, real redis-server, file://
store), without secure aggregation: the published trained factor is the float64 oracle's (each client's step of
it clipped adapter-wide to C, weighted 1/K, plus the noise the federation's secret key derives), the frame is
the previous round's bit for bit, no residual appears, and ``status`` reports each client's epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation.dp import PrivacyAccountant, gaussian_noise_dense, noise_generator
from chorus_mq.names import ADAPTER_WEIGHTS, FED_SB_FILE, Factor
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import strategy_spec

from ..deltas import declared, write_adapter, write_r_adapter
from ..server_opt_oracle import PEFT_PREFIX, Steps

MODULES = ("layers.0.q", "layers.0.v")
K, C, Z = 3, 2.0, 0.5


@pytest.mark.parametrize(
    ("strategy", "server_opt"), [("ffa-lora", "none"), ("fed-sb", "none"), ("rolora", "none"), ("ffa-lora", "fedadam")]
)
def test_a_linear_dp_round_releases_the_clipped_steps_plus_the_keyed_noise_on_the_trained_factor(
    sdk, tmp_path, strategy, server_opt
):
    """Two rounds (rolora: B, then A); under ``--server-opt fedadam`` the optimiser steps the trained factor
    from the noised release (post-processing), its state keyed by the trained factor as without DP."""
    name = strategy.replace("-", "") + server_opt
    spec = strategy_spec(strategy)
    g = torch.Generator().manual_seed(7)
    initial = {
        m: (torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g) if spec.sandwich else torch.zeros(16, 4))
        for m in MODULES
    }
    opt = {"server_opt": server_opt, "server_lr": 0.02, "server_tau": 1e-2} if server_opt != "none" else {}
    config = FederationConfig(
        name=name, base_model="m", quorum=K, strategy=strategy, clip_norm=C, dp_noise_multiplier=Z, **opt
    )
    steps = {(m, f): Steps(server_opt, 0.02, tau=1e-2) for m in MODULES for f in spec.trains}
    sdk.create_federation(config, model=declared(initial), initial_adapter=write_adapter(tmp_path / "0.st", initial))
    key = sdk.state.noise_key(name)
    tensors_file = FED_SB_FILE if spec.sandwich else ADAPTER_WEIGHTS
    previous = tmp_path / f"{name}-0"
    sdk.pull(name, previous, 0)
    for r in (1, 2):
        trains = spec.trainable(r)
        suffix = f".{trains}.weight"
        before = load_file(previous / tensors_file)
        moved: dict[str, dict[str, np.ndarray]] = {}
        for i in range(K):
            noise = torch.Generator().manual_seed(100 * r + i)
            spread = 3.0 if i == 2 else 0.05  # client 2's step is far above C, the others' below
            factors = {}
            moved[f"c{i}"] = {}
            for m in MODULES:
                k = f"{PEFT_PREFIX}{m}"
                mine = before[k + suffix] + spread * torch.randn(before[k + suffix].shape, generator=noise)
                moved[f"c{i}"][m] = mine.double().numpy() - before[k + suffix].double().numpy()
                a, b = before[f"{k}.lora_A.weight"], before[f"{k}.lora_B.weight"]
                factors[m] = mine if spec.sandwich else (mine, b) if trains == Factor.LORA_A else (a, mine)
            file = tmp_path / f"{name}-r{r}-c{i}.safetensors"
            (write_r_adapter if spec.sandwich else write_adapter)(file, factors)
            sdk.upload(name, file, f"c{i}", dataset_size=100.0 + 37 * i)
        clips = {
            c: min(1.0, C / math.sqrt(sum(float(np.sum(s * s)) for s in step.values()))) for c, step in moved.items()
        }
        assert clips["c2"] < 1.0 and clips["c0"] == clips["c1"] == 1.0
        out = tmp_path / f"{name}-{r}"
        manifest = sdk.pull(name, out, r)
        after = load_file(out / tensors_file)
        for m in MODULES:
            k = f"{PEFT_PREFIX}{m}"
            old = before[k + suffix].double().numpy()
            drawn = gaussian_noise_dense(*old.shape, Z * C / K, noise_generator(key, name, r, k), torch.float64)
            release = old + sum(clips[c] / K * step[m] for c, step in moved.items()) + drawn.numpy()
            want = release if server_opt == "none" else old + steps[(m, trains)](release - old)
            got = after[k + suffix].double().numpy()
            tolerance = 1e-6 if server_opt == "none" else 1e-5  # fedadam: float32 state, as without DP
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance, f"round {r} {m}"
            for frozen in {"lora_A", "lora_B"} - {str(trains)}:  # the frame, bit for bit
                assert torch.equal(after[f"{k}.{frozen}.weight"], before[f"{k}.{frozen}.weight"])
        assert all(shard.residual is None for shard in manifest.shards)
        assert manifest.dp == {"noise_multiplier": Z, "clip_norm": C, "delta": 1e-5, "quorum": K}
        assert sorted(manifest.clipped) == [f"c2|{PEFT_PREFIX}{m}" for m in MODULES]
        assert all(math.isclose(f, clips["c2"], rel_tol=1e-9) for f in manifest.clipped.values())
        previous = out
    privacy = sdk.status(name).privacy
    acc = PrivacyAccountant()
    acc.spend(Z, rounds=2)
    for c in ("c0", "c1", "c2"):
        assert privacy[c]["rounds"] == 2
        assert math.isclose(privacy[c]["epsilon"], acc.epsilon(1e-5), rel_tol=1e-12)
