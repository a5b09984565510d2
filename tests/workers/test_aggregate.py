"""Aggregation through the worker path (eager): weights, missing modules, heads, idempotency, chained rounds."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from chorus_mq.adapters import LoraSpec, read_residual
from chorus_mq.names import MissingModules
from chorus_mq.pulled import iter_correction
from chorus_mq.workers import runtime
from chorus_mq.workers.plan import Plan, plan_round
from chorus_mq.workers.shard import ShardResult, compute_shard

from ..deltas import make_federation, random_factors, write_adapter


def _truth(clients, weights, module, alpha=8.0):
    """Σ wᵢ sᵢ Bᵢ Aᵢ over the clients that carry ``module``, weights normalised over all of ``weights``."""
    total = sum(weights)
    return sum(
        (w / total) * (alpha / f[module][0].shape[0]) * f[module][1].double() @ f[module][0].double()
        for w, f in zip(weights, clients, strict=True)
        if module in f
    )


def _reconstruct(out, module):
    spec = LoraSpec.from_peft_config(json.loads((out / "adapter_config.json").read_text()))
    tensors = load_file(out / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    A, B = tensors[f"{key}.lora_A.weight"].double(), tensors[f"{key}.lora_B.weight"].double()
    got = spec.scaling(key, A.shape[0]) * B @ A
    res = read_residual(out / "residual.safetensors").get(key)
    if res is not None:
        got = got + (res.left.double() @ res.right.double() if res.dense is None else res.dense.double())
    return got


def _upload_three(sdk, tmp_path):
    full = [random_factors(i) for i in range(2)]
    partial = {"layers.0.q": random_factors(9)["layers.0.q"]}
    sizes = [100, 200, 300]
    for i, f in enumerate([*full, partial]):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", f), f"c{i}", dataset_size=sizes[i])
    return [*full, partial], sizes


def test_a_missing_module_is_a_zero_update_under_the_clients_weight(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=3)
    clients, sizes = _upload_three(sdk, tmp_path)
    out = tmp_path / "out"
    sdk.pull("fed", out)
    torch.testing.assert_close(
        _reconstruct(out, "layers.0.q"), _truth(clients, sizes, "layers.0.q"), rtol=1e-5, atol=1e-5
    )
    # c2 (weight 1/2) did not train v: it counts as a zero update, so nobody owns a module alone
    torch.testing.assert_close(
        _reconstruct(out, "layers.0.v"), _truth(clients, sizes, "layers.0.v"), rtol=1e-5, atol=1e-5
    )


def test_renormalising_over_holders_is_an_explicit_option(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=3, missing_modules=MissingModules.RENORMALISE)
    clients, sizes = _upload_three(sdk, tmp_path)
    out = tmp_path / "out"
    sdk.pull("fed", out)
    # only c0 and c1 carry v: their weights renormalise to 1/3, 2/3
    torch.testing.assert_close(
        _reconstruct(out, "layers.0.v"), _truth(clients[:2], sizes[:2], "layers.0.v"), rtol=1e-5, atol=1e-5
    )


def test_modules_to_save_are_weighted_means(sdk, tmp_path):
    head = "base_model.model.score.weight"
    make_federation(sdk, "fed", quorum=2, extras={head: torch.zeros(3, 4)}, max_client_weight=1.0)
    heads = [torch.full((3, 4), 1.0), torch.full((3, 4), 4.0)]
    for i in range(2):
        write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i), extras={head: heads[i]})
        sdk.upload("fed", tmp_path / f"c{i}.safetensors", f"c{i}", dataset_size=[1, 3][i])
    out = tmp_path / "out"
    sdk.pull("fed", out)
    torch.testing.assert_close(
        load_file(out / "adapter_model.safetensors")[head], torch.full((3, 4), 0.25 * 1 + 0.75 * 4)
    )


def test_aggregation_is_idempotent_and_deterministic(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=2)
    for i in range(2):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i)), f"c{i}")
    rt = runtime.current()
    info = rt.state.round("fed", 1)
    assert info.state == "complete"
    assert plan_round(rt, "fed", 1, info.epoch, dispatch=None) == "stale"  # already done: nothing happens
    manifest = sdk.pull("fed", tmp_path / "out")
    # a second, independent computation of the same shard writes byte-identical objects
    from chorus_mq.workers.plan import make_plan

    plan = make_plan(rt, "fed", 1)
    again = compute_shard(rt, "fed", 1, 0, plan, rt.state.config("fed"))
    assert isinstance(plan, Plan) and isinstance(again, ShardResult)
    assert again.adapter == manifest.shards[0].adapter
    assert again.residual == manifest.shards[0].residual


def test_residuals_chain_across_rounds(sdk, tmp_path):
    make_federation(sdk, "fed", quorum=2)
    per_round = []
    out = tmp_path / "out"
    for r in (1, 2, 3):
        for i in range(2):
            sdk.upload("fed", write_adapter(tmp_path / f"r{r}c{i}.safetensors", random_factors(10 * r + i)), f"c{i}")
        sdk.pull("fed", out, r, residual_adapter=(r == 3))  # a continuing client: increments only
        per_round.append(read_residual(out / "residual.safetensors"))
    total = dict(iter_correction(out))
    assert set(total) == set(per_round[0])
    for key, value in total.items():
        want = sum(res[key].to_dense().double() for res in per_round)
        torch.testing.assert_close(value.to_dense().double(), want, rtol=1e-5, atol=1e-5)
    assert (out / "residual_adapter" / "adapter_config.json").is_file()


def test_out_rank_applies_to_svd_only(sdk, tmp_path):
    for strategy in ("fedex-lora", "svd"):
        make_federation(sdk, strategy, quorum=2, strategy=strategy, out_rank=2)
        for i in range(2):
            sdk.upload(strategy, write_adapter(tmp_path / f"{strategy}{i}.safetensors", random_factors(i)), f"c{i}")
        out = tmp_path / strategy
        sdk.pull(strategy, out)
        rank = load_file(out / "adapter_model.safetensors")["base_model.model.layers.0.q.lora_A.weight"].shape[0]
        assert rank == (2 if strategy == "svd" else 4)
        torch.testing.assert_close(
            _reconstruct(out, "layers.0.q"),
            _truth([random_factors(0), random_factors(1)], [1, 1], "layers.0.q"),
            rtol=1e-5,
            atol=1e-5,
        )


def test_the_manifest_times_the_shard_tasks_so_the_rest_of_the_round_is_its_serial_part(sdk, tmp_path):
    """``timings["shards"]``: every shard task's wall time summed (benchmarks/rounds.py takes the round's length
    beyond it as the part no worker count shortens); it covers the shards' own phases and lies within the round."""
    make_federation(sdk, "fed", quorum=2)
    for i in range(2):
        sdk.upload("fed", write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i)), f"c{i}")
    manifest = sdk.pull("fed", tmp_path / "out")
    t = manifest.timings
    assert t["fetch"] + t["write"] <= t["shards"] <= t["quorum_to_commit"]
