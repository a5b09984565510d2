"""Clients move increments, not history: 20 rounds of a continuing client, a late joiner from a snapshot,
sharded and unsharded rounds, all against a float64 oracle."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.adapters import LoraSpec, read_residual
from chorus_mq.errors import ConfigError, ObjectMissing
from chorus_mq.pulled import iter_correction
from chorus_mq.workers import runtime

from .deltas import make_federation, random_factors, write_adapter

pytestmark = pytest.mark.services  # the eager SDK runs against a private redis-server

MODULES = ("layers.0.q", "layers.0.v", "layers.1.q")


def _round_update(pulled, clients: dict[str, dict], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Float64: M_t - s·B·A of the pulled adapter, per module (the round's exact residual)."""
    spec = LoraSpec.from_peft_config(json.loads((pulled / "adapter_config.json").read_text()))
    tensors = load_file(pulled / "adapter_model.safetensors")
    out = {}
    for module in MODULES:
        key = f"base_model.model.{module}"
        truth = sum(
            weights[c] * (8.0 / f[module][0].shape[0]) * f[module][1].double() @ f[module][0].double()
            for c, f in clients.items()
        )
        A, B = tensors[f"{key}.lora_A.weight"].double(), tensors[f"{key}.lora_B.weight"].double()
        out[key] = truth - spec.scaling(key, A.shape[0]) * B @ A
    return out


def _dense(path):
    return {k: v.to_dense().double() for k, v in read_residual(path).items()}


def _correction(pulled):
    """The base correction a pulled directory holds: its cumulative file plus the increments not folded yet."""
    return {k: v.to_dense().double() for k, v in iter_correction(pulled)}


def _close(got: dict, want: dict) -> None:
    assert set(got) <= set(want)
    for key, value in want.items():
        have = got.get(key, torch.zeros_like(value))
        err = float(torch.linalg.norm(have - value) / max(float(torch.linalg.norm(value)), 1e-12))
        assert err < 1e-5, (key, err)


def test_twenty_rounds_a_continuing_client_and_a_late_joiner_are_exact(make_sdk, tmp_path):
    sdk = make_sdk()
    make_federation(sdk, "fed", quorum=3, factors=random_factors(0, modules=MODULES), checkpoint_every=5)
    continuing = tmp_path / "continuing"
    cumulative: dict[str, torch.Tensor] = {}
    at_17: dict[str, torch.Tensor] = {}
    for r in range(1, 21):
        clients = {}
        for i in range(3):
            f = random_factors(100 * r + i, modules=MODULES, r=(2, 4, 3)[i])
            clients[f"c{i}"] = f
            sdk.upload("fed", write_adapter(tmp_path / f"d{r}-{i}.safetensors", f), f"c{i}", dataset_size=10.0 + i)
        manifest = sdk.pull("fed", continuing, r)
        weights = {c.client_id: c.weight for c in manifest.clients}
        for key, value in _round_update(continuing, clients, weights).items():
            cumulative[key] = cumulative.get(key, torch.zeros_like(value)) + value
        _close(_dense(continuing / "residual.safetensors"), _round_update(continuing, clients, weights))
        _close(_correction(continuing), cumulative)
        if r == 17:
            at_17 = {k: v.clone() for k, v in cumulative.items()}
            shutil.copytree(continuing, tmp_path / "continuing-17")
    snapshots = runtime.current().state.snapshots("fed")
    assert sorted(snapshots) == [5, 10, 15, 20]  # compacted every 5 rounds, off the critical path
    # a late joiner: the snapshot of round 15 and the increments of 16 and 17
    late = tmp_path / "late"
    sdk.pull("fed", late, 17)
    _close(_correction(late), at_17)
    for name in ("adapter_model.safetensors", "residual.safetensors", "adapter_config.json"):
        assert (late / name).read_bytes() == (tmp_path / "continuing-17" / name).read_bytes()
    # and one joining at the end starts from the last snapshot alone
    sdk.pull("fed", tmp_path / "latest")
    _close(_correction(tmp_path / "latest"), cumulative)
    # folded on request into the one file a user folds into the base weights
    sdk.pull("fed", continuing, fold=True)
    assert not list((continuing / "increments").iterdir())
    _close(_dense(continuing / "cumulative_residual.safetensors"), cumulative)


def test_a_continuing_clients_pull_rewrites_a_bounded_share_of_its_correction(make_sdk, tmp_path):
    sdk = make_sdk()
    make_federation(sdk, "fed", quorum=2)
    out = tmp_path / "out"
    written = []
    for r in range(1, 13):
        for i in range(2):
            sdk.upload("fed", write_adapter(tmp_path / f"d{r}{i}.safetensors", random_factors(10 * r + i)), f"c{i}")
        before = {p: p.stat().st_ino for p in out.rglob("*.safetensors")} if out.exists() else {}
        sdk.pull("fed", out, r)
        after = {p: p.stat().st_ino for p in out.rglob("*.safetensors")}
        written.append(sum(p.stat().st_size for p, ino in after.items() if before.get(p) != ino))
    # increments are folded once they outweigh the cumulative file: the bytes a pull writes stay bounded
    # (the 4x4 modules turn dense after two rounds; from then on at most one fold's worth per pull)
    assert max(written[4:]) <= 3 * min(written[4:]) + 4096


def _payload(path) -> int:
    """A safetensors file's tensor bytes: its size less its header."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def _disk(directory) -> int:
    """Bytes of the files under ``directory``, each inode once (residual.safetensors may link an increment)."""
    inodes = {p.stat().st_ino: p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    return sum(inodes.values())


def test_a_continuing_clients_correction_stays_within_its_modules_dense_size(make_sdk, tmp_path):
    # 48x48 modules: dense is 9 KiB, a round's residual (rank 4 of 3 clients' 2 each) 1.5 KiB factored. The
    # correction turns dense after 6 rounds; increments appended after that must not pile up beside it.
    d = 48
    sdk = make_sdk()
    make_federation(sdk, "fed", quorum=3, factors=random_factors(0, modules=MODULES, r=2, d_out=d, d_in=d))
    dense = len(MODULES) * d * d * 4
    out = tmp_path / "out"
    cumulative: dict[str, torch.Tensor] = {}
    for r in range(1, 19):
        clients = {f"c{i}": random_factors(100 * r + i, modules=MODULES, r=2, d_out=d, d_in=d) for i in range(3)}
        for c, f in clients.items():
            sdk.upload("fed", write_adapter(tmp_path / f"d{r}{c}.safetensors", f), c, dataset_size=10.0)
        manifest = sdk.pull("fed", out, r)
        weights = {c.client_id: c.weight for c in manifest.clients}
        for key, value in _round_update(out, clients, weights).items():
            cumulative[key] = cumulative.get(key, torch.zeros_like(value)) + value
        parts = [out / "cumulative_residual.safetensors", *(out / "increments").iterdir()]
        assert sum(_payload(p) for p in parts) <= dense, (r, [p.name for p in parts])
        own = sum((out / name).stat().st_size for name in ("adapter_model.safetensors", "residual.safetensors"))
        assert _disk(out) <= dense + own + 64 * 1024, r  # + the round's own files, headers and JSON
        _close(_correction(out), cumulative)  # and it stays exact


def test_pull_since_needs_the_round_the_directory_holds(make_sdk, tmp_path):
    sdk = make_sdk()
    make_federation(sdk, "fed", quorum=1)
    for r in (1, 2, 3):
        sdk.upload("fed", write_adapter(tmp_path / f"d{r}.safetensors", random_factors(r)), "c0")
    out = tmp_path / "out"
    sdk.pull("fed", out, 1)
    with pytest.raises(ConfigError, match="holds round 1"):
        sdk.pull("fed", out, 3, since=2)
    sdk.pull("fed", out, 3, since=1)
    assert json.loads((out / "state.json").read_text())["round"] == 3


def test_sharded_and_unsharded_rounds_are_byte_identical(make_sdk, tmp_path):
    many = [f"layers.{i}.{m}" for i in range(6) for m in ("q", "v")]
    paths = [write_adapter(tmp_path / f"c{i}.safetensors", random_factors(i, modules=many, r=2 + i)) for i in range(3)]
    pulled = {}
    for name, settings in (("one", {}), ("split", {"shard_bytes": 2000})):  # a few modules per shard
        sdk = make_sdk(**settings)  # the eager tasks run with this SDK's settings
        make_federation(sdk, name, quorum=3, factors=random_factors(0, modules=many))
        for i, path in enumerate(paths):
            sdk.upload(name, path, f"c{i}", dataset_size=1.0 + i)
        pulled[name] = sdk.pull(name, tmp_path / name)
    one, split = pulled["one"], pulled["split"]
    assert len(one.shards) == 1 and len(split.shards) > 3
    for name in ("adapter_model.safetensors", "residual.safetensors", "cumulative_residual.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name


def test_pulling_the_round_a_directory_holds_downloads_nothing(make_sdk, tmp_path):
    sdk = make_sdk()
    make_federation(sdk, "fed", quorum=2)
    for i in range(2):
        sdk.upload("fed", write_adapter(tmp_path / f"d{i}.safetensors", random_factors(i)), f"c{i}")
    out = tmp_path / "out"
    first = sdk.pull("fed", out, 1)
    files = {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    manifest_sha = sdk.state.round("fed", 1).manifest_sha256
    for shard in first.shards:  # gone from the store: a pull that fetched them again would fail
        for ref in (shard.adapter, shard.residual):
            if ref is not None:
                sdk.store.delete(ref.key)
    again = sdk.pull("fed", out, 1)
    assert again == first and sdk.state.round("fed", 1).manifest_sha256 == manifest_sha
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files
    with pytest.raises(ObjectMissing):  # asking for more than the directory holds fetches again
        sdk.pull("fed", out, 1, exact_adapter=True)
