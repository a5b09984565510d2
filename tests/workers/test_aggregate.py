"""Aggregation inside the worker: weights, policies, idempotency, chained residuals."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from chorus_mq.adapters import LoraSpec, read_residual
from chorus_mq.layout import manifest_key
from chorus_mq.state import FederationKeys
from chorus_mq.workers import runtime
from chorus_mq.workers.aggregate import _compute_and_write, aggregate_round

from ..deltas import random_factors, write_adapter


def _truth(clients, weights, module, alpha=8.0):
    total = sum(weights)
    return sum((w / total) * (alpha / f[module][0].shape[0]) * f[module][1].double() @ f[module][0].double()
               for w, f in zip(weights, clients))


def _reconstruct(out, module):
    spec = LoraSpec.from_peft_config(json.loads((out / "adapter_config.json").read_text()))
    tensors = load_file(out / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    A, B = tensors[f"{key}.lora_A.weight"].double(), tensors[f"{key}.lora_B.weight"].double()
    got = spec.scaling(key, A.shape[0]) * B @ A
    res = read_residual(out / "residual.safetensors").get(key)
    if res is not None:
        got = got + (res[0].double() @ res[1].double() if isinstance(res, tuple) else res.double())
    return got


def test_missing_module_is_renormalised_over_its_holders(sdk, tmp_path):
    sdk.create_federation("fed", base_model="m", quorum=3)
    full = [random_factors(i) for i in range(2)]
    partial = {"layers.0.q": random_factors(9)["layers.0.q"]}
    sizes = [100, 200, 300]
    for i, f in enumerate([*full, partial]):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", f), f"c{i}", dataset_size=sizes[i])
    out = tmp_path / "out"
    sdk.pull("fed", out)
    q = _reconstruct(out, "layers.0.q")
    torch.testing.assert_close(q, _truth([*full, partial], sizes, "layers.0.q"), rtol=1e-5, atol=1e-5)
    v = _reconstruct(out, "layers.0.v")  # only c0 and c1 carry v: their weights renormalise to 1/3, 2/3
    torch.testing.assert_close(v, _truth(full, sizes[:2], "layers.0.v"), rtol=1e-5, atol=1e-5)


def test_modules_to_save_are_weighted_means(sdk, tmp_path):
    sdk.create_federation("fed", base_model="m", quorum=2)
    heads = [torch.full((3, 4), 1.0), torch.full((3, 4), 4.0)]
    for i in range(2):
        extras = {"base_model.model.score.weight": heads[i]}
        write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i), extras=extras)
        sdk.upload("fed", tmp_path / f"c{i}.safetensors", f"c{i}", dataset_size=[1, 3][i])
    out = tmp_path / "out"
    sdk.pull("fed", out)
    head = load_file(out / "adapter_model.safetensors")["base_model.model.score.weight"]
    torch.testing.assert_close(head, torch.full((3, 4), 0.25 * 1 + 0.75 * 4))


def test_aggregation_is_idempotent_and_deterministic(sdk, tmp_path):
    sdk.create_federation("fed", base_model="m", quorum=2)
    for i in range(2):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i)), f"c{i}")
    rt = runtime.current()
    info = rt.state.round("fed", 1)
    assert info["state"] == "complete"
    assert aggregate_round(rt, "fed", 1, int(info["epoch"])) == "stale"  # already done: nothing happens
    first = rt.store.get_bytes(manifest_key("fed", 1))
    # a second, independent computation of the same round produces byte-identical objects
    rt.redis.hset(FederationKeys("fed").round(1), "state", "aggregating")
    again = json.loads(_compute_and_write(rt, "fed", 1))
    objects = json.loads(first)["objects"]
    for name in ("adapter_model.safetensors", "residual.safetensors"):
        assert again["objects"][name]["sha256"] == objects[name]["sha256"]


def test_residuals_chain_across_rounds(sdk, tmp_path):
    sdk.create_federation("fed", base_model="m", quorum=2)
    per_round = []
    for r in (1, 2, 3):
        for i in range(2):
            sdk.upload("fed", write_adapter(tmp_path / f"r{r}c{i}.safetensors", random_factors(10 * r + i)), f"c{i}")
        out = tmp_path / f"out{r}"
        sdk.pull("fed", out, r)
        per_round.append(read_residual(out / "residual.safetensors"))
    total = read_residual(tmp_path / "out3" / "cumulative_residual.safetensors")
    for key, value in total.items():
        dense = value[0].double() @ value[1].double() if isinstance(value, tuple) else value.double()
        want = sum((res[key][0].double() @ res[key][1].double() if isinstance(res[key], tuple) else res[key].double())
                   for res in per_round)
        torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out3" / "residual_adapter" / "adapter_config.json").is_file()


def test_out_rank_applies_to_svd_only(sdk, tmp_path):
    for strategy in ("fedex-lora", "svd"):
        sdk.create_federation(strategy, base_model="m", quorum=2, strategy=strategy, out_rank=2)
        for i in range(2):
            sdk.upload(strategy, write_adapter(tmp_path / f"{strategy}{i}.safetensors", random_factors(i)), f"c{i}")
        out = tmp_path / strategy
        sdk.pull(strategy, out)
        rank = load_file(out / "adapter_model.safetensors")["base_model.model.layers.0.q.lora_A.weight"].shape[0]
        assert rank == (2 if strategy == "svd" else 4)
        torch.testing.assert_close(_reconstruct(out, "layers.0.q"), _truth(
            [random_factors(0), random_factors(1)], [1, 1], "layers.0.q"), rtol=1e-5, atol=1e-5)
