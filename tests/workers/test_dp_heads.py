"""Server-side DP covers the task head (``modules_to_save``) through the worker path (eager tasks, real
redis-server, file:// store): each client's head step joins its adapter update in one clip factor, and the
published head is ``h_start + Σ q_i c_i (h_i − h_b) + N(0, (z C / K)^2)`` with the noise the federation's key
derives for the head tensor; the modules' release carries the same clip factors. Synchronous rounds (fedex-lora, svd,
ffa-lora) and buffered flushes (each delta against its own base version's head); ``--personal-heads`` publishes
round 0's head as it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation.dp import gaussian_noise_dense, noise_generator
from chorus_mq.names import ADAPTER_WEIGHTS, TaskType
from chorus_mq.staleness import StalenessRule
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter
from ..server_opt_oracle import PEFT_PREFIX, published

HEAD = "base_model.model.score.weight"
MODULES = ("layers.0.q", "layers.0.v")
K, C, Z = 3, 2.0, 0.5
SIGMA = Z * C / K


def _create(sdk, tmp_path, name, **options):
    """A seq-cls federation under DP whose round 0 holds small factors and a head; returns round 0's pull."""
    factors = random_factors(99, modules=MODULES, r=4, scale=0.01)
    head = {HEAD: torch.randn(3, 12, generator=torch.Generator().manual_seed(7))}
    path = write_adapter(tmp_path / f"{name}-initial.safetensors", factors, extras=head)
    config = FederationConfig(
        name=name,
        base_model="m",
        quorum=K,
        clip_norm=C,
        dp_noise_multiplier=Z,
        task_type=TaskType.SEQ_CLS,
        labels=("a", "b", "c"),
        **options,
    )
    sdk.create_federation(config, model=declared(factors, head), initial_adapter=path)
    start = tmp_path / f"{name}-0"
    sdk.pull(name, start, 0)
    return start


def _head_noise(key: str, name: str, r: int) -> np.ndarray:
    return gaussian_noise_dense(3, 12, SIGMA, noise_generator(key, name, r, HEAD), torch.float64).numpy()


def _client_head(start: np.ndarray, seed: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.from_numpy(start).float() + spread * torch.randn(3, 12, generator=g)


@pytest.mark.parametrize("strategy", ["fedex-lora", "svd", "ffa-lora"])
def test_a_dp_round_clips_the_head_with_the_adapter_and_publishes_it_noised(sdk, tmp_path, strategy):
    """Two rounds: client 2's adapter update is below C but its head step is far above, so its one clip factor
    shrinks both its head step and its module update; round 2's head steps are taken from round 1's head."""
    name = strategy.replace("-", "")
    previous = _create(sdk, tmp_path, name, strategy=strategy)
    key = sdk.state.noise_key(name)
    for r in (1, 2):
        before, earlier = load_file(previous / ADAPTER_WEIGHTS), published(previous)
        h_start = before[HEAD].double().numpy()
        moved: dict[str, dict[str, np.ndarray]] = {}  # each client's update per module (s B A, or B's step)
        head_steps: dict[str, np.ndarray] = {}
        for i in range(K):
            c = f"c{i}"
            head = _client_head(h_start, 50 * r + i, 20.0 if i == 2 else 0.05)
            head_steps[c] = head.double().numpy() - h_start
            if strategy == "ffa-lora":  # the frozen A as published, B moved a little from the published B
                g = torch.Generator().manual_seed(100 * r + i)
                factors = {}
                for m in MODULES:
                    a, b = before[f"{PEFT_PREFIX}{m}.lora_A.weight"], before[f"{PEFT_PREFIX}{m}.lora_B.weight"]
                    factors[m] = (a, b + 0.05 * torch.randn(b.shape, generator=g))
                moved[c] = {  # the trained factor's step, in its own units (aggregation.dp_linear)
                    m: B.double().numpy() - before[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
                    for m, (_, B) in factors.items()
                }
            else:
                factors = random_factors(100 * r + i, modules=MODULES, r=4, scale=0.01)
                moved[c] = {m: 2.0 * B.double().numpy() @ A.double().numpy() for m, (A, B) in factors.items()}
            path = write_adapter(tmp_path / f"{name}-r{r}-{c}.safetensors", factors, extras={HEAD: head})
            sdk.upload(name, path, c, dataset_size=100.0 + 37 * i)
        adapter_sq = {c: math.fsum(float(np.sum(u * u)) for u in step.values()) for c, step in moved.items()}
        clips = {c: min(1.0, C / math.sqrt(adapter_sq[c] + float(np.sum(head_steps[c] ** 2)))) for c in moved}
        assert all(math.sqrt(s) < C for s in adapter_sq.values())  # no adapter alone would be clipped
        assert clips["c0"] == clips["c1"] == 1.0 and clips["c2"] < 0.5
        out = tmp_path / f"{name}-{r}"
        manifest = sdk.pull(name, out, r)
        total, _, heads = published(out)
        want_head = h_start + sum(clips[c] / K * s for c, s in head_steps.items()) + _head_noise(key, name, r)
        assert np.linalg.norm(heads[HEAD] - want_head) / np.linalg.norm(want_head) < 1e-6, f"round {r} head"
        for m in MODULES:
            module = f"{PEFT_PREFIX}{m}"
            gen = noise_generator(key, name, r, module)
            if strategy == "ffa-lora":  # B's release: the clipped steps and the noise on B, times the frozen A
                a = before[f"{module}.lora_A.weight"].double().numpy()
                b = before[f"{module}.lora_B.weight"].double().numpy()
                noise = gaussian_noise_dense(16, 4, SIGMA, gen, torch.float64).numpy()
                steps = sum(clips[c] / K * step[m] for c, step in moved.items())
                want = 2.0 * (b + steps + noise) @ a
            else:  # the dense release: Σ c_i / K s B_i A_i plus dense noise, on the residuals of earlier rounds
                noise = gaussian_noise_dense(16, 12, SIGMA, gen).double().numpy()
                carried = earlier[0][module] - earlier[1][module]
                want = carried + sum(clips[c] / K * step[m] for c, step in moved.items()) + noise
            assert np.linalg.norm(total[module] - want) / np.linalg.norm(want) < 1e-6, f"round {r} {m}"
        assert sorted(manifest.clipped) == sorted([f"c2|{HEAD}", *(f"c2|{PEFT_PREFIX}{m}" for m in MODULES)])
        assert all(math.isclose(f, clips["c2"], rel_tol=1e-9) for f in manifest.clipped.values())
        previous = out


def test_a_dp_flush_steps_each_head_from_its_own_base_versions_head(sdk, tmp_path):
    """Buffered fedex-lora under DP: weights g(τ) / K times the one clip factor over the delta's update and its
    head's step, both against the delta's own base version; version v + 1's head is
    ``h_v + Σ w_i (h_i − h_{b_i}) + Z`` (η 1)."""
    name = "dpbuf"
    options = {"mode": "buffered", "relative_clip": 0.0, "weights": "uniform", "max_staleness": 2}
    options["staleness_weight"] = "poly:0.5"
    start = _create(sdk, tmp_path, name, **options)
    key = sdk.state.noise_key(name)
    rule = StalenessRule.parse("poly:0.5")
    x, products, heads = published(start)[0], {0: published(start)[1]}, {0: published(start)[2][HEAD]}
    flushes = {1: [("c0", 0), ("c1", 0), ("c2", 0)], 2: [("c0", 1), ("c1", 0), ("c2", 1)]}
    clipped = set()
    for v, uploads in flushes.items():
        head = heads[v - 1].copy()
        for c, b in uploads:
            i = int(c[1:])
            factors = random_factors(10 * v + i, modules=MODULES, r=4, scale=0.01)
            mine = _client_head(heads[b], 20 * v + i, 20.0 if c == "c2" else 0.05)
            path = write_adapter(tmp_path / f"{name}-{v}-{c}.safetensors", factors, extras={HEAD: mine})
            res = sdk.upload(name, path, c, dataset_size=100.0, base_version=b)
            assert res.status == "accepted", res
            delta = {
                m: 2.0 * B.double().numpy() @ A.double().numpy() - products[b][f"{PEFT_PREFIX}{m}"]
                for m, (A, B) in factors.items()
            }
            head_step = mine.double().numpy() - heads[b]
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()) + float(np.sum(head_step**2)))
            w = rule.g(v - 1 - b) / K * min(1.0, C / norm)
            if norm > C:
                clipped.add((v, c))
            for m in MODULES:
                x[f"{PEFT_PREFIX}{m}"] = x[f"{PEFT_PREFIX}{m}"] + w * delta[m]
            head = head + w * head_step
        for m in MODULES:
            module = f"{PEFT_PREFIX}{m}"
            noise = gaussian_noise_dense(16, 12, SIGMA, noise_generator(key, name, v, module)).double().numpy()
            x[module] = x[module] + noise
        head = head + _head_noise(key, name, v)
        out = tmp_path / f"{name}-{v}"
        sdk.pull(name, out, v)
        total, products[v], got = published(out)
        heads[v] = got[HEAD]
        assert np.linalg.norm(got[HEAD] - head) / np.linalg.norm(head) < 1e-6, f"version {v} head"
        error = max(float(np.linalg.norm(total[m] - x[m]) / np.linalg.norm(x[m])) for m in x)
        assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
    assert {(1, "c2"), (2, "c2")} <= clipped, clipped  # client 2's huge head step, each flush
    assert clipped != {(v, c) for v, ups in flushes.items() for c, _ in ups}  # and not everyone


def test_dp_with_personal_heads_publishes_round_0s_head_and_clips_the_adapter_alone(sdk, tmp_path):
    """The head is not published from the clients' data: it stays round 0's, bit for bit, and the clip factors
    cover the adapter updates alone."""
    start = _create(sdk, tmp_path, "ph", personal_heads=True)
    head0 = load_file(start / ADAPTER_WEIGHTS)[HEAD]
    for i in range(K):
        factors = random_factors(300 + i, modules=MODULES, r=4, scale=3.0 if i == 2 else 0.01)
        sdk.upload("ph", write_adapter(tmp_path / f"ph-c{i}.safetensors", factors), f"c{i}")
    out = tmp_path / "ph-1"
    manifest = sdk.pull("ph", out, 1)
    assert torch.equal(load_file(out / ADAPTER_WEIGHTS)[HEAD], head0)
    assert sorted(manifest.clipped) == [f"c2|{PEFT_PREFIX}{m}" for m in MODULES]
