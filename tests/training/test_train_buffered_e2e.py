"""``chorus-mq train`` in a buffered federation: two processes over redis-server, moto S3 and a worker
subprocess, on MiniLM; one is SIGKILLed after its first upload and restarted. Each makes ``--rounds 2``
contributions and no delta counts twice. With ffa-lora, each version is the float64 oracle's, every delta
taken against its own base version, A frozen bit for bit and no residual."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
import torch
from pyarrow import csv
from safetensors.torch import load, load_file

from chorus_mq.names import ADAPTER_WEIGHTS
from chorus_mq.training.data import load_examples, resolve_model

from ..topology import wait_for

pytestmark = pytest.mark.e2e

LABELS = ("rotten", "fresh")
SHARE = 64
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shares(tmp_path_factory):
    root = tmp_path_factory.mktemp("buffered-data")
    reviews = load_examples("rotten-tomatoes")
    order = list(range(len(reviews)))
    random.Random(1).shuffle(order)
    files = []
    for i in range(2):
        part = reviews.subset(order[i * SHARE : (i + 1) * SHARE])
        assert part.labels is not None
        table = pa.table({"review": list(part.texts), "verdict": [LABELS[j] for j in part.labels]})
        csv.write_csv(table, root / f"share{i}.csv")
        files.append(root / f"share{i}.csv")
    return files


def _train(deployment, client, secret, data_file, workdir):
    return deployment.popen_cli(
        "train",
        "-f",
        "buf",
        "--client-id",
        client,
        "--model",
        "minilm",
        "--data",
        str(data_file),
        "--text-column",
        "review",
        "--label-column",
        "verdict",
        "--workdir",
        str(workdir),
        "--rounds",
        "2",
        "--steps-per-round",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--timeout",
        "600",
        "--json",
        env={**ONE_THREAD, "CHORUS_CLIENT_SECRET": secret},
    )


@pytest.mark.parametrize("strategy", ["fedex-lora", "ffa-lora"])
def test_two_clients_train_continuously_and_a_restart_counts_once(deployment, shares, tmp_path, strategy):
    torch.set_num_threads(1)
    deployment.start_worker(concurrency=1)
    created = deployment.cli(
        "federation",
        "create",
        "buf",
        "--base-model",
        str(resolve_model("minilm")),
        "--mode",
        "buffered",
        "--buffer",
        "2",
        "--max-staleness",
        "3",
        "--task",
        "seq-cls",
        "--labels",
        ",".join(LABELS),
        "--target-modules",
        "query,value",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--strategy",
        strategy,
    )
    assert "buffered: flush every 2 deltas" in created.stdout
    sdk = deployment.sdk()
    secrets = [sdk.add_client("buf", f"c{i}").secret for i in range(2)]
    c1 = _train(deployment, "c1", secrets[1], shares[1], tmp_path / "c1")
    wait_for(lambda: "c1" in sdk.state.deltas("buf", 1), 600, "c1's first upload")
    deployment.kill(c1)
    c1 = _train(deployment, "c1", secrets[1], shares[1], tmp_path / "c1")
    c0 = _train(deployment, "c0", secrets[0], shares[0], tmp_path / "c0")
    for proc in (c0, c1):
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, f"train exited {proc.returncode}\n{out}\n{err[-4000:]}"
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [r["state"] for r in records] == ["complete", "complete"], records
    # two flushes of two deltas each: every contribution in exactly one, none twice
    owners: dict[tuple[str, str], int] = {}
    for v in (1, 2):
        assert str(sdk.state.round("buf", v).state) == "complete"
        for client, rec in sdk.state.deltas("buf", v).items():
            assert (client, rec.sha256) not in owners
            owners[(client, rec.sha256)] = v
            assert rec.base_version is not None and rec.base_version < v
    assert sorted(c for c, _ in owners) == ["c0", "c0", "c1", "c1"]
    status = json.loads(deployment.cli("status", "-f", "buf", "--json").stdout)
    assert status["mode"] == "buffered" and status["latest_complete"] == 2
    if strategy == "ffa-lora":
        _check_linear_versions(sdk, tmp_path, 2)


def _check_linear_versions(sdk, tmp_path, latest: int) -> None:
    """ffa-lora: version v+1's s B A is version v's plus Σ p_i s (B_i − B_b) A (η = 1) to 1e-6 relative per module,
    each delta against the version it trained from (whether any is stale depends on timing here; the fault
    tests make them so); A is version 0's bit for bit; no residual."""
    f64 = torch.float64
    versions, manifests = {}, {}
    for v in range(latest + 1):
        manifests[v] = sdk.pull("buf", tmp_path / f"global-{v}", v)
        versions[v] = load_file(tmp_path / f"global-{v}" / ADAPTER_WEIGHTS)
    modules = sorted(k.removesuffix(".lora_A.weight") for k in versions[0] if k.endswith(".lora_A.weight"))
    assert modules

    def model(t, m):
        return 2.0 * t[f"{m}.lora_B.weight"].to(f64) @ t[f"{m}.lora_A.weight"].to(f64)  # alpha 8 / rank 4

    for v in range(1, latest + 1):
        assert all(shard.residual is None for shard in manifests[v].shards)
        records = sdk.state.deltas("buf", v)
        entries = {e.client_id: e for e in manifests[v].clients}
        for m in modules:
            want = model(versions[v - 1], m)
            for client, rec in records.items():
                upload = load(sdk.store.get_bytes(rec.key))
                assert entries[client].base_version == rec.base_version
                want += entries[client].weight * (model(upload, m) - model(versions[rec.base_version], m))
            got = model(versions[v], m)
            assert float((got - want).norm() / want.norm()) <= 1e-6, (v, m)
            assert torch.equal(versions[v][f"{m}.lora_A.weight"], versions[0][f"{m}.lora_A.weight"])
