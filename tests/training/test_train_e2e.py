"""Three ``chorus-mq train`` processes over redis-server, moto S3 and a worker subprocess, on MiniLM and
disjoint shares of Rotten Tomatoes (one share per data format); one client is SIGKILLed mid-round and
restarted. Then ``chorus-mq export`` writes a plain model with the exact logits, and a DP client reports
the epsilon its accountant computed."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
import torch
from pyarrow import csv, parquet

from chorus_mq.names import TaskType
from chorus_mq.training.data import Examples, load_examples, resolve_model
from chorus_mq.training.local_round import evaluate, predict
from chorus_mq.training.model import exact_model, load_tokenizer

from ..topology import wait_for
from .clients import create_federation, train_process, train_records

pytestmark = pytest.mark.e2e

LABELS = ("rotten", "fresh")
SHARE, HELD_OUT = 160, 200
TRAIN_ARGS = (
    "--rounds",
    "2",
    "--steps-per-round",
    "12",
    "--batch-size",
    "16",
    "--max-length",
    "48",
    "--lr",
    "5e-3",
    "--timeout",
    "600",
    "--json",
)


def _table(examples: Examples) -> pa.Table:
    assert examples.labels is not None
    return pa.table({"review": list(examples.texts), "verdict": [LABELS[i] for i in examples.labels]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Held-out reviews (CSV) and three disjoint training shares: CSV, JSON Lines, Parquet."""
    root = tmp_path_factory.mktemp("data")
    reviews = load_examples("rotten-tomatoes")
    order = list(range(len(reviews)))
    random.Random(0).shuffle(order)
    held_out = reviews.subset(order[:HELD_OUT])
    csv.write_csv(_table(held_out), root / "held_out.csv")
    files = []
    for i, fmt in enumerate(("csv", "jsonl", "parquet")):
        share = _table(reviews.subset(order[HELD_OUT + i * SHARE : HELD_OUT + (i + 1) * SHARE]))
        path = root / f"share{i}.{fmt}"
        if fmt == "csv":
            csv.write_csv(share, path)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in share.to_pylist()))
        else:
            parquet.write_table(share, path)
        files.append(path)
    return {"held_out": root / "held_out.csv", "shares": files, "examples": held_out}


def _create(deployment, name: str, quorum: int, *extra: str) -> None:
    create_federation(
        deployment, name, resolve_model("minilm"), LABELS, "--lora-alpha", "8", "--seed", "0", *extra, quorum=quorum
    )


def _train(deployment, name: str, client: str, secret: str, data_file, workdir, *extra: str):
    return train_process(
        deployment, name, client, secret, "--model", "minilm", "--data", str(data_file), "--text-column", "review",
        "--label-column", "verdict", "--workdir", str(workdir), *TRAIN_ARGS, *extra,
    )  # fmt: skip


def _records(proc, *phases: str) -> list[dict]:
    records, err = train_records(proc, timeout=1500)
    # never silent outside a terminal: every round it took part in has its phase lines on stderr
    for rec in records:
        assert f"train: round {rec['round']}: uploading" in err, err[-4000:]
        assert f"train: round {rec['round']}: {rec['upload']}" in err, err[-4000:]
    for phase in phases:
        assert phase in err, err[-4000:]
    return records


def test_three_clients_one_killed_and_restarted_learn_and_export_exactly(deployment, data, tmp_path):
    torch.set_num_threads(1)
    deployment.start_worker(concurrency=1)
    _create(deployment, "rt", quorum=3)
    sdk = deployment.sdk()
    secrets = [sdk.add_client("rt", f"c{i}").secret for i in range(3)]
    eval_args = ("--eval-data", str(data["held_out"]))

    # c2 first: once its round-1 upload is in (the round still waits for the other two), SIGKILL it
    c2 = _train(deployment, "rt", "c2", secrets[2], data["shares"][2], tmp_path / "c2", *eval_args)
    wait_for(lambda: "c2" in sdk.round("rt", 1).clients, 600, "c2's round-1 upload")
    deployment.kill(c2)
    c2 = _train(deployment, "rt", "c2", secrets[2], data["shares"][2], tmp_path / "c2", *eval_args)
    c0 = _train(deployment, "rt", "c0", secrets[0], data["shares"][0], tmp_path / "c0", *eval_args)
    c1 = _train(deployment, "rt", "c1", secrets[1], data["shares"][1], tmp_path / "c1", *eval_args)
    records = [_records(p) for p in (c0, c1, c2)]

    assert [[r["round"] for r in rec] for rec in records] == [[1, 2]] * 3
    assert records[2][0]["upload"] == "duplicate"  # the restart re-sent the very bytes it had trained
    for r in (1, 2):
        summary = sdk.round("rt", r)
        assert str(summary.state) == "complete" and summary.clients == ("c0", "c1", "c2") and summary.n == 3

    # every client evaluated the same global model; it learned the task
    tokenizer = load_tokenizer(resolve_model("minilm"))
    untrained = evaluate(
        exact_model(sdk_pull(sdk, "rt", 0, tmp_path / "r0"), resolve_model("minilm"), task=TaskType.SEQ_CLS),
        tokenizer,
        data["examples"],
        task=TaskType.SEQ_CLS,
        max_length=48,
    )
    finals = {rec[1]["eval_accuracy"] for rec in records}
    assert len(finals) == 1
    assert finals.pop() > untrained.accuracy + 0.05

    # export: a plain transformers model with the exact PEFT model's logits
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "exported"
    deployment.cli("export", "-f", "rt", "--model", "minilm", "--output", str(out))
    pulled = sdk_pull(sdk, "rt", 2, tmp_path / "r2")
    texts = list(data["examples"].texts[:32])
    want = predict(exact_model(pulled, resolve_model("minilm"), task=TaskType.SEQ_CLS), tokenizer, texts)
    got = predict(AutoModelForSequenceClassification.from_pretrained(out).eval(), tokenizer, texts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == dict(enumerate(LABELS))


def test_train_with_dp_reports_its_accountants_epsilon(deployment, data, tmp_path):
    from opacus.accountants import RDPAccountant

    deployment.start_worker(concurrency=1)
    _create(deployment, "dp", 1, "--prox-mu", "0.01")  # the federation's FedProx weight reaches train
    sdk = deployment.sdk()
    secret = sdk.add_client("dp", "solo").secret
    proc = _train(
        deployment,
        "dp",
        "solo",
        secret,
        data["shares"][0],
        tmp_path / "solo",
        "--dp-epsilon",
        "3",
        "--dp-delta",
        "1e-5",
        "--dp-clip",
        "1.0",
    )
    records = _records(proc, "FedProx: pulled toward each round's global model with mu 0.01")
    ledger = json.loads((tmp_path / "solo" / "privacy.json").read_text())
    accountant = RDPAccountant()
    accountant.history = [(ledger["noise_multiplier"], 16 / SHARE, 24)]
    assert records[-1]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert records[-1]["epsilon"] == pytest.approx(3.0, rel=0.02)  # the two planned rounds spend the budget
    assert sdk.status("dp").client_dp["solo"]["epsilon"] == pytest.approx(records[-1]["epsilon"])


def sdk_pull(sdk, federation: str, round_: int, out):
    sdk.pull(federation, out, round_)
    return out


def test_personal_heads_stay_with_each_client_and_export_per_client(deployment, tiny_bert_dir, tmp_path):
    """Two `train` processes on a tiny BERT, a --personal-heads federation, 2 rounds of quorum 2: the body is
    aggregated, each client keeps its own head (never uploaded), and `export --head own` gives each client's
    model, the one its `train` evaluated."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from chorus_mq.names import ADAPTER_WEIGHTS
    from chorus_mq.training.heads import apply_head, own_head

    from .test_local import DATA

    torch.set_num_threads(1)
    deployment.start_worker(concurrency=1)
    labels = ("awful", "great", "okay")
    create_federation(deployment, "ph", tiny_bert_dir, labels, "--personal-heads", quorum=2)
    sdk = deployment.sdk()
    assert sdk.status("ph").personal_heads
    assert "each client keeps its own (--personal-heads)" in deployment.cli("status", "-f", "ph").stdout

    def table(idx):
        return pa.table({"text": [DATA.texts[i] for i in idx], "label": [labels[DATA.labels[i]] for i in idx]})

    held_out = tmp_path / "held_out.csv"
    csv.write_csv(table(range(48)), held_out)
    procs = {}
    for client, majority in (("a", 0), ("b", 1)):  # opposite label skews: 16 of one class, 5 others
        others = [i for i in range(48) if DATA.labels[i] != majority][:5]
        share = tmp_path / f"{client}.csv"
        csv.write_csv(table([i for i in range(48) if DATA.labels[i] == majority] + others), share)
        secret = sdk.add_client("ph", client).secret
        procs[client] = train_process(
            deployment, "ph", client, secret, "--model", str(tiny_bert_dir), "--data", str(share),
            "--eval-data", str(held_out), "--workdir", str(tmp_path / client), "--rounds", "2",
            "--steps-per-round", "10", "--batch-size", "8", "--lr", "2e-2", "--max-length", "32",
            "--balance-labels", "off", "--timeout", "300", "--json",
        )  # fmt: skip
    records = {c: _records(p, "personal heads: this client keeps its own task head") for c, p in procs.items()}
    assert all([r["round"] for r in rec] == [1, 2] for rec in records.values())
    assert sdk.round("ph", 2).clients == ("a", "b")

    pulled = sdk_pull(sdk, "ph", 2, tmp_path / "r2")
    initial = load_file(str(sdk_pull(sdk, "ph", 0, tmp_path / "r0") / ADAPTER_WEIGHTS))
    published = load_file(str(pulled / ADAPTER_WEIGHTS))
    heads = {c: own_head(tmp_path / c, "ph") for c in procs}
    assert {h.round for h in heads.values()} == {2}
    for key in heads["a"].tensors:
        assert torch.equal(published[key], initial[key])  # the published head stays round 0's
        assert float((heads["a"].tensors[key] - heads["b"].tensors[key]).abs().max()) > 1e-4  # one head per client
    for client in procs:  # what went up: the body only
        uploaded = load_file(str(tmp_path / client / "rounds" / "000002" / "adapter" / ADAPTER_WEIGHTS))
        assert not set(uploaded) & set(heads[client].tensors)

    tokenizer = load_tokenizer(tiny_bert_dir)
    texts = list(DATA.texts[:12])
    exported = {}
    for client in procs:
        out = tmp_path / f"export-{client}"
        res = deployment.cli(
            "export", "-f", "ph", "--model", str(tiny_bert_dir), "--head", "own", "--client-id", client,
            "--workdir", str(tmp_path / client), "--output", str(out),
        )  # fmt: skip
        assert f"with {client}'s own head (trained in round 2)" in res.stdout
        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
        exported[client] = predict(plain, tokenizer, texts)
        # the client's model: round 2's exact body with its own head, which its train evaluated
        model = exact_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS)
        apply_head(model, heads[client].tensors)
        torch.testing.assert_close(exported[client], predict(model, tokenizer, texts), rtol=0, atol=1e-5)
        score = evaluate(plain, tokenizer, load_examples(held_out, labels=labels), task=TaskType.SEQ_CLS, max_length=32)
        assert records[client][-1]["eval_loss"] == pytest.approx(score.loss, abs=1e-5)
    assert float((exported["a"] - exported["b"]).abs().max()) > 1e-3
    res = deployment.cli("export", "-f", "ph", "--model", str(tiny_bert_dir), "--output", str(tmp_path / "global"))
    assert "its task head is round 0's" in res.stdout
