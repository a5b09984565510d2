"""The linear strategies (ffa-lora, rolora) over real services: redis-server, moto S3 and a worker subprocess;
a federation created by the CLI; two clients running ``train`` through the SDK for two rounds. Each round
says what its clients train; the published model is the float64 oracle's average of the uploads' products
with no residual, the frozen factor published bit for bit and stored once (each round refers to the objects
that last wrote it; a continuing client fetches the trained factor only); ``export`` gives the exact PEFT
model's logits; an upload whose frozen factor moved by one ulp is refused and the round is unharmed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from chorus_mq.errors import Rejected
from chorus_mq.names import ADAPTER_WEIGHTS, CUMULATIVE_FILE, INCREMENTS_DIR, RESIDUAL_FILE, TaskType
from chorus_mq.results import fetch_manifest
from chorus_mq.training.data import Examples
from chorus_mq.training.local_round import predict
from chorus_mq.training.model import exact_model, load_tokenizer

from ..store_reads import count_adapter_reads
from .clients import create_federation, train_all
from .test_local import WORDS

pytestmark = [pytest.mark.e2e, pytest.mark.services]

LABELS = ("awful", "great", "okay")
ROUNDS = 2
F64 = torch.float64


def _data(owner: int) -> Examples:
    labels = [(owner + i) % 3 for i in range(18)]
    texts = [f"the film was {WORDS[y]} {'really ' * (i % 3)}overall, client {owner}" for i, y in enumerate(labels)]
    return Examples(tuple(texts), tuple(labels))


def _client_data(client: str) -> Examples:
    return _data(int(client[1]))


#: the local training of the tests' ``train`` runs (besides the rounds)
TRAINING = {"steps_per_round": 3, "batch_size": 6, "lr": 5e-2, "max_length": 32}


def _modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))


@pytest.mark.parametrize(
    ("strategy", "trains"), [("ffa-lora", ["lora_B", "lora_B", "lora_B"]), ("rolora", ["lora_B", "lora_A", "lora_B"])]
)
def test_linear_federation_is_exact_with_no_residual(deployment, tiny_bert_dir, tmp_path, strategy, trains):
    torch.set_num_threads(1)
    fed = "lin"
    deployment.start_worker(concurrency=1)
    create_federation(deployment, fed, tiny_bert_dir, LABELS, "--strategy", strategy, quorum=2)
    operator = deployment.sdk()
    status = json.loads(deployment.cli("status", "-f", fed, "--json").stdout)
    assert status["strategy"] == strategy and status["trainable"] == trains[0]
    assert f"clients train {trains[0]} this round" in deployment.cli("status", "-f", fed).stdout
    secrets = {c: operator.add_client(fed, c).secret for c in ("c0", "c1")}
    train_all(deployment, fed, secrets, _client_data, tmp_path, model_dir=tiny_bert_dir, rounds=ROUNDS, **TRAINING)

    # every round says what its clients train: the event, the round info, status
    opened = [e for e in operator.state.events(fed).read() if e.type == "round_opened"]
    assert [e.get("trainable") for e in opened] == trains[: len(opened)] and len(opened) == ROUNDS + 1
    assert [operator.round(fed, r).trainable for r in range(1, ROUNDS + 2)] == trains
    assert operator.status(fed).trainable == trains[ROUNDS]

    adapters = {0: load_file(operator_pull(operator, fed, 0, tmp_path) / ADAPTER_WEIGHTS)}
    a0 = adapters[0]
    for m in _modules(a0):  # round 0: A seeded, B = 0
        assert bool(a0[f"{m}.lora_A.weight"].abs().sum() > 0) and not bool(a0[f"{m}.lora_B.weight"].any())
    for r in range(1, ROUNDS + 1):
        pulled = operator_pull(operator, fed, r, tmp_path)
        manifest = json.loads((pulled / "manifest.json").read_text())
        assert all(shard["residual"] is None for shard in manifest["shards"])  # no residual, ever
        adapters[r] = load_file(pulled / ADAPTER_WEIGHTS)
        records = operator.state.deltas(fed, r)
        weights = {e["client_id"]: e["weight"] for e in manifest["clients"]}
        uploads = {c: load(operator.store.get_bytes(records[c].key)) for c in records}
        alpha = json.loads((pulled / "adapter_config.json").read_text())["lora_alpha"]
        scaling = alpha / 4
        frozen = "lora_A" if trains[r - 1] == "lora_B" else "lora_B"
        for m in _modules(adapters[r]):
            got = scaling * adapters[r][f"{m}.lora_B.weight"].to(F64) @ adapters[r][f"{m}.lora_A.weight"].to(F64)
            want = sum(
                weights[c] * scaling * (u[f"{m}.lora_B.weight"].to(F64) @ u[f"{m}.lora_A.weight"].to(F64))
                for c, u in uploads.items()
            )
            assert float((got - want).norm() / want.norm()) <= 1e-6, (r, m)
            key = f"{m}.{frozen}.weight"  # published bit for bit, as the round's start had it
            assert torch.equal(adapters[r][key], adapters[r - 1][key])
            assert all(torch.equal(u[key], adapters[r - 1][key]) for u in uploads.values())
            trained = f"{m}.{trains[r - 1]}.weight"
            assert not torch.equal(adapters[r][trained], adapters[r - 1][trained])  # it trained

    # a continuing client's disk holds no correction: nothing residual was fetched or kept
    held = tmp_path / "c0" / "pulled"
    assert not any((held / INCREMENTS_DIR).iterdir())
    assert max((held / name).stat().st_size for name in (RESIDUAL_FILE, CUMULATIVE_FILE)) < 1024  # empty files

    # a round after round 0 stores the trained factor and the head only, its manifest referring to the objects
    # that last wrote the frozen one (ffa-lora: round 0; rolora: the round before, which trained it)
    head = {k for k in a0 if ".lora_" not in k}
    assert head  # a seq-cls federation's task head
    for r in range(1, ROUNDS + 1):
        manifest, _ = fetch_manifest(operator.state, operator.store, fed, r)
        frozen = _frozen(trains[r - 1])
        assert manifest.frame is not None and manifest.frame.factors == (frozen,)
        assert manifest.frame.round == (0 if strategy == "ffa-lora" else r - 1)
        stored = {k: t for s in manifest.shards for k, t in load(operator.store.get_bytes(s.adapter.key)).items()}
        assert set(stored) == {f"{m}.{trains[r - 1]}.weight" for m in _modules(a0)} | head
        assert manifest.adapter_bytes == sum(t.numel() * 4 for t in stored.values())

    # a continuing client's pull fetches the round's objects only: the trained factor and the head
    cont = tmp_path / "continuing"
    operator.pull(fed, cont, ROUNDS - 1)
    fetched = count_adapter_reads(operator.store)
    manifest = operator.pull(fed, cont, ROUNDS)
    suffix = f".{_frozen(trains[ROUNDS - 1])}.weight"
    frozen_bytes = sum(t.numel() * 4 for k, t in adapters[ROUNDS].items() if k.endswith(suffix))
    whole = sum(s.adapter.size for s in manifest.shards)
    assert frozen_bytes > 0 and fetched[0] == whole  # none of the frozen factor's bytes
    assert (cont / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / f"global-{ROUNDS}" / ADAPTER_WEIGHTS).read_bytes()
    # a held copy that is not the one pulled (the file's hash changed) is not trusted: the frame is fetched again
    stale = tmp_path / "stale"
    operator.pull(fed, stale, ROUNDS - 1)
    tensors = load_file(stale / ADAPTER_WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith(f".{_frozen(trains[ROUNDS - 1])}.weight"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(stale / ADAPTER_WEIGHTS))
    operator.pull(fed, stale, ROUNDS)
    assert (stale / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / f"global-{ROUNDS}" / ADAPTER_WEIGHTS).read_bytes()

    # export: a plain model with the exact PEFT model's logits
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "exported"
    deployment.cli("export", "-f", fed, "--model", str(tiny_bert_dir), "--output", str(out))
    tokenizer = load_tokenizer(tiny_bert_dir)
    texts = list(_data(0).texts[:8])
    want_logits = predict(
        exact_model(tmp_path / f"global-{ROUNDS}", tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, texts
    )
    got_logits = predict(AutoModelForSequenceClassification.from_pretrained(out).eval(), tokenizer, texts)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)

    # a frozen factor one ulp off is refused, clearly, and the open round is unharmed
    r = ROUNDS + 1
    start = tmp_path / "c0" / "pulled"
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    tensors = load_file(start / ADAPTER_WEIGHTS)
    frozen = "lora_A" if trains[r - 1] == "lora_B" else "lora_B"
    key = sorted(k for k in tensors if k.endswith(f".{frozen}.weight"))[0]
    moved = tensors[key].clone()
    moved.view(-1)[0] = torch.nextafter(moved.view(-1)[0], torch.tensor(1e9))
    tensors[key] = moved
    save_file(tensors, str(tampered / ADAPTER_WEIGHTS))
    (tampered / "adapter_config.json").write_text((start / "adapter_config.json").read_text())
    client = deployment.sdk(client_secret=secrets["c0"])
    with pytest.raises(Rejected, match=f"freezes {frozen}.*not bit-identical to the one round {ROUNDS} published"):
        client.upload(fed, tampered, "c0", dataset_size=10.0, round_=r, timeout=120)
    info = operator.round(fed, r)
    assert (str(info.state), info.n) == ("open", 0)


def operator_pull(operator, fed: str, r: int, tmp_path):
    out = tmp_path / f"global-{r}"
    operator.pull(fed, out, r)
    return out


def _frozen(trained: str) -> str:
    return "lora_A" if trained == "lora_B" else "lora_B"
