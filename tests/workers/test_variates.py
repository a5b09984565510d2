"""SCAFFOLD's server variate through the worker path (eager tasks, real redis-server, file:// store).

Round objects in, a variate object per shard out, equal to a float64 oracle of the documented step
(DESIGN.md section 1), bit-identical on a rerun, bounded against a hostile lr_sum; uploads that
cannot take part are refused with a reason.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation.variates import gauge_rotation
from chorus_mq.errors import ConfigError, Rejected
from chorus_mq.names import ADAPTER_WEIGHTS, VARIATE_FILE, Strategy
from chorus_mq.state import FederationConfig
from chorus_mq.workers import runtime
from chorus_mq.workers.plan import make_plan
from chorus_mq.workers.shard import compute_shard

from ..deltas import declared, random_factors, write_adapter
from ..variate_oracle import server_step

HEAD = "base_model.model.score.weight"
MODULES = ("layers.0.q", "layers.0.v")
F64 = torch.float64


def _federation(sdk, tmp_path, name="fed", **options):
    """A SCAFFOLD federation whose round 0 is a seeded adapter (A random, B zero) with a head."""
    start = {m: (a, torch.zeros_like(b)) for m, (a, b) in random_factors(100).items()}
    head = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    initial = write_adapter(tmp_path / f"{name}-initial.safetensors", start, extras={HEAD: head})
    config = FederationConfig(name=name, base_model="m", quorum=3, scaffold=True, **options)
    sdk.create_federation(config, model=declared(start, {HEAD: head}), initial_adapter=initial)
    return name


def _tensors(path):
    return {k: v.double() for k, v in load_file(path).items()}


def _round(sdk, tmp_path, name, r, lr_sums, sizes=(1, 2, 3)):
    """Every client trains from round r-1's global (x + a step of its own); returns x and the uploads."""
    pulled = tmp_path / f"{name}-pulled-{r - 1}"
    sdk.pull(name, pulled, r - 1)
    x = _tensors(pulled / ADAPTER_WEIGHTS)
    uploads = []
    for i, lr_sum in enumerate(lr_sums):
        g = torch.Generator().manual_seed(1000 * r + i)
        y = {k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=F64)).float() for k, v in x.items()}
        factors = {
            m: (y[f"base_model.model.{m}.lora_A.weight"], y[f"base_model.model.{m}.lora_B.weight"]) for m in MODULES
        }
        path = write_adapter(tmp_path / f"{name}-r{r}-c{i}.safetensors", factors, extras={HEAD: y[HEAD]})
        sdk.upload(name, path, f"c{i}", dataset_size=sizes[i], lr_sum=lr_sum)
        uploads.append({k: v.double() for k, v in y.items()})
    return x, uploads


def test_the_server_variate_is_the_oracles_over_rounds_and_a_rerun_is_bit_identical(sdk, tmp_path):
    name = _federation(sdk, tmp_path)
    server: dict[str, torch.Tensor] = {}
    # round 2: c2 declares a tiny lr_sum (its Δc ~1e6 times the others'): clipped to 10x the median
    for r, lr_sums in ((1, [0.1, 0.2, 0.3]), (2, [0.1, 0.2, 1e-7])):
        x, uploads = _round(sdk, tmp_path, name, r, lr_sums)
        out = tmp_path / f"{name}-pulled-{r}"
        manifest = sdk.pull(name, out, r)
        weights = [{c.client_id: c.weight for c in manifest.clients}[f"c{i}"] for i in range(3)]
        assert weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
        got = _tensors(out / VARIATE_FILE)
        want = server_step(x, server, uploads, lr_sums, weights, _tensors(out / ADAPTER_WEIGHTS))
        assert set(got) == set(want) == set(_tensors(out / ADAPTER_WEIGHTS))
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
        server = got
        clipped = manifest.variate_clipped
        assert (
            (clipped == {})
            if r == 1
            else (set(clipped) == {f"c2|{HEAD}", *(f"c2|base_model.model.{m}" for m in MODULES)})
        )
        assert all(0 < f < 1e-3 for f in clipped.values())
    # the basis really turned (round 0's A is random, round 1's canonical): the transport mattered
    a_key = f"base_model.model.{MODULES[0]}.lora_A.weight"
    rotation = gauge_rotation(
        _tensors(tmp_path / f"{name}-pulled-1" / ADAPTER_WEIGHTS)[a_key],
        _tensors(tmp_path / f"{name}-pulled-0" / ADAPTER_WEIGHTS)[a_key],
    )
    assert float((rotation - torch.eye(4, dtype=F64)).abs().max()) > 0.1

    # a second, independent computation of the round's shard writes the same variate object
    rt = runtime.current()
    plan = make_plan(rt, name, 2)
    assert plan.variate_fraction == 1.0
    again = compute_shard(rt, name, 2, 0, plan, rt.state.config(name))
    assert again.variate == manifest.shards[0].variate and again.adapter == manifest.shards[0].adapter


def test_the_fraction_is_the_rounds_share_of_the_federations_clients(make_sdk, tmp_path):
    sdk = make_sdk()
    name = _federation(sdk, tmp_path)
    for i in range(3):
        sdk.add_client(name, f"c{i}")
    sdk.add_client(name, "idle")  # registered, never uploads: the round stands for 3 of 4 clients
    secrets = {f"c{i}": sdk.clients(name).secret(f"c{i}") for i in range(3)}
    pulled = tmp_path / "p0"
    sdk.pull(name, pulled, 0)
    x = _tensors(pulled / ADAPTER_WEIGHTS)
    for i in range(3):
        y = {k: (v + 0.1).float() for k, v in x.items()}
        factors = {
            m: (y[f"base_model.model.{m}.lora_A.weight"], y[f"base_model.model.{m}.lora_B.weight"]) for m in MODULES
        }
        path = write_adapter(tmp_path / f"c{i}.safetensors", factors, extras={HEAD: y[HEAD]})
        sdk.upload(name, path, f"c{i}", dataset_size=1, lr_sum=0.5, secret=secrets[f"c{i}"])
    sdk.pull(name, tmp_path / "p1", 1)
    # every client moved the head by +0.1 in 0.5: Δc = -0.2, and the step is 3/4 of it
    torch.testing.assert_close(_tensors(tmp_path / "p1" / VARIATE_FILE)[HEAD], torch.full((3, 12), -0.15, dtype=F64))


def test_uploads_that_cannot_take_part_are_refused_with_their_reason(sdk, tmp_path):
    name = _federation(sdk, tmp_path)
    pulled = tmp_path / "p0"
    sdk.pull(name, pulled, 0)
    x = _tensors(pulled / ADAPTER_WEIGHTS)
    factors = {
        m: (x[f"base_model.model.{m}.lora_A.weight"].float(), x[f"base_model.model.{m}.lora_B.weight"].float())
        for m in MODULES
    }
    path = write_adapter(tmp_path / "ok.safetensors", factors, extras={HEAD: x[HEAD].float()})
    with pytest.raises(Rejected, match="must declare lr_sum"):
        sdk.upload(name, path, "a")
    with pytest.raises(Rejected, match="lr_sum must be a finite number of at least"):
        sdk.upload(name, path, "b", lr_sum=1e-30)
    with pytest.raises(ConfigError, match="lr_sum"):
        sdk.upload(name, path, "c", lr_sum=-1.0)  # refused before anything is uploaded
    low = write_adapter(tmp_path / "low.safetensors", random_factors(3, r=2), extras={HEAD: x[HEAD].float()})
    with pytest.raises(Rejected, match=r"has rank 2 .*global adapter .*has rank 4"):
        sdk.upload(name, low, "d", lr_sum=0.1)
    alpha = write_adapter(tmp_path / "alpha.safetensors", factors, extras={HEAD: x[HEAD].float()}, alpha=16.0)
    with pytest.raises(Rejected, match=r"rank 4 and scaling 4;.*rank 4 and scaling 2"):
        sdk.upload(name, alpha, "e", lr_sum=0.1)
    assert sdk.round(name, 1).n == 0


def test_scaffold_needs_a_start_one_rank_and_no_server_noise(sdk):
    with pytest.raises(ConfigError, match="stack"):
        FederationConfig(name="s", base_model="m", quorum=1, scaffold=True, strategy=Strategy.STACK)
    with pytest.raises(ConfigError, match="differential privacy"):
        FederationConfig(name="s", base_model="m", quorum=1, scaffold=True, clip_norm=1.0, dp_noise_multiplier=1.0)
    config = FederationConfig(name="s", base_model="m", quorum=1, scaffold=True)
    with pytest.raises(ConfigError, match="initial adapter"):
        sdk.create_federation(config, model=declared(random_factors(0)))
