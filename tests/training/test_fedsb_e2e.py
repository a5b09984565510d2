"""Fed-SB over real services (redis-server, moto S3, a worker subprocess): a federation created by the CLI
publishes an orthonormal frame with R = 0; clients upload ``<module>.lora_R.weight`` only; each round's R is
the float64 oracle's average (the update ``s B R A`` exact, no residual, the frame bit for bit); ``pull`` turns
it into a standard PEFT adapter; a continuing client fetches R and the head only; ``export`` gives the exact
PEFT model's logits; malformed uploads are refused with the round unharmed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from chorus_mq.errors import InvalidAdapter, Rejected
from chorus_mq.names import ADAPTER_WEIGHTS, FED_SB_FILE, TaskType
from chorus_mq.results import fetch_manifest
from chorus_mq.training.local_round import predict
from chorus_mq.training.model import exact_model, load_tokenizer

from ..store_reads import count_adapter_reads
from .clients import create_federation, train_all
from .test_linear_e2e import LABELS, TRAINING, _client_data, _data

pytestmark = [pytest.mark.e2e, pytest.mark.services]

RANK = 4
F64 = torch.float64


def _modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".lora_R.weight") for k in tensors if k.endswith(".lora_R.weight"))


def _r_upload(pulled, out, seed: int, *, drop=(), extra=None, rank: int = RANK):
    """An upload directory: a random R per module (and the pulled head, nudged), the pulled adapter_config."""
    published = load_file(pulled / FED_SB_FILE)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in _modules(published):
        tensors[f"{m}.lora_R.weight"] = 0.1 * torch.randn(rank, rank, generator=g)
    for k, t in published.items():
        if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_R.weight")):
            tensors[k] = t + 0.01 * torch.randn(t.shape, generator=g)
    for k in drop:
        tensors.pop(k)
    tensors.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    (out / "adapter_config.json").write_text((pulled / "adapter_config.json").read_text())
    return out


def _submit_raw(sdk, fed: str, client: str, r: int, adapter_dir):
    """Store a delta of the directory's tensors as they are (no local checks) and submit its record."""
    import hashlib

    from chorus_mq.adapters import write_safetensors
    from chorus_mq.layout import delta_key
    from chorus_mq.messages import IngestMessage
    from chorus_mq.names import DELTA_FORMAT

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    path = adapter_dir / "raw.safetensors"
    meta = {"format": DELTA_FORMAT, "adapter_config": json.dumps(config, sort_keys=True)}
    write_safetensors(path, load_file(adapter_dir / ADAPTER_WEIGHTS), meta)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    sdk.store.put_file(delta_key(fed, client, sha), path, write_once=True)
    msg = IngestMessage(
        federation=fed, round=r, client_id=client, sha256=sha, size=path.stat().st_size, dataset_size=10.0
    )
    return sdk.submit(msg, wait=True, timeout=120)


def test_fed_sb_federation_is_exact_and_pulls_r_only(deployment, tiny_bert_dir, tmp_path):
    torch.set_num_threads(1)
    fed = "sb"
    deployment.start_worker(concurrency=1)
    create_federation(deployment, fed, tiny_bert_dir, LABELS, "--strategy", "fed-sb", quorum=2, rank=RANK)
    operator = deployment.sdk()
    status = json.loads(deployment.cli("status", "-f", fed, "--json").stdout)
    assert status["strategy"] == "fed-sb" and status["trainable"] == "lora_R"
    assert "clients train lora_R this round, between the published frame" in deployment.cli("status", "-f", fed).stdout

    # round 0: the frame (orthonormal B columns, A rows), R = 0; the PEFT form is a zero update
    g0 = tmp_path / "global-0"
    operator.pull(fed, g0, 0)
    p0, peft0 = load_file(g0 / FED_SB_FILE), load_file(g0 / ADAPTER_WEIGHTS)
    modules = _modules(p0)
    assert modules and not any(k.endswith(".lora_R.weight") for k in peft0)
    eye = torch.eye(RANK, dtype=F64)
    for m in modules:
        b, a = p0[f"{m}.lora_B.weight"].to(F64), p0[f"{m}.lora_A.weight"].to(F64)
        assert (b.T @ b - eye).abs().max() < 1e-5 and (a @ a.T - eye).abs().max() < 1e-5
        assert not p0[f"{m}.lora_R.weight"].any() and not peft0[f"{m}.lora_B.weight"].any()
        assert torch.equal(peft0[f"{m}.lora_A.weight"], p0[f"{m}.lora_A.weight"])

    held = {0: g0}
    for r in (1, 2):
        for i, c in enumerate(("c0", "c1")):
            up = _r_upload(held[r - 1], tmp_path / f"up-{r}-{c}", seed=10 * r + i)
            operator.upload(fed, up, c, dataset_size=float(3 + 5 * i), round_=r, timeout=120)
        operator.wait_round(fed, r, timeout=120)
        out = tmp_path / f"global-{r}"
        manifest = operator.pull(fed, out, r)
        held[r] = out
        assert all(s.residual is None for s in manifest.shards)  # no residual, ever
        pub, peft = load_file(out / FED_SB_FILE), load_file(out / ADAPTER_WEIGHTS)
        records = operator.state.deltas(fed, r)
        uploads = {c: load(operator.store.get_bytes(records[c].key)) for c in records}
        weights = {e["client_id"]: e["weight"] for e in json.loads((out / "manifest.json").read_text())["clients"]}
        assert sorted(uploads) == ["c0", "c1"]
        scaling = json.loads((out / "adapter_config.json").read_text())["lora_alpha"] / RANK
        for m in modules:
            b, a = p0[f"{m}.lora_B.weight"].to(F64), p0[f"{m}.lora_A.weight"].to(F64)
            # the frame is published bit for bit; the uploads carry lora_R only
            assert torch.equal(pub[f"{m}.lora_B.weight"], p0[f"{m}.lora_B.weight"])
            assert torch.equal(pub[f"{m}.lora_A.weight"], p0[f"{m}.lora_A.weight"])
            assert all(set(u) >= {f"{m}.lora_R.weight"} and f"{m}.lora_A.weight" not in u for u in uploads.values())
            want = sum(weights[c] * scaling * (b @ u[f"{m}.lora_R.weight"].to(F64) @ a) for c, u in uploads.items())
            got = scaling * b @ pub[f"{m}.lora_R.weight"].to(F64) @ a
            assert float((got - want).norm() / want.norm()) <= 1e-6, (r, m)
            # the pulled PEFT adapter is the same update (lora_B = B R, lora_A = A)
            peft_got = scaling * peft[f"{m}.lora_B.weight"].to(F64) @ peft[f"{m}.lora_A.weight"].to(F64)
            assert float((peft_got - want).norm() / want.norm()) <= 1e-6, (r, m)

    # a round after round 0 stores R and the head only, its manifest referring to round 0's objects for the frame
    m0, _ = fetch_manifest(operator.state, operator.store, fed, 0)
    head = {k for k in p0 if ".lora_" not in k}
    assert head  # a seq-cls federation's task head
    for r in (1, 2):
        manifest, _ = fetch_manifest(operator.state, operator.store, fed, r)
        assert manifest.frame is not None and manifest.frame.round == 0
        assert [s.adapter for s in manifest.frame.shards] == [s.adapter for s in m0.shards]
        stored = {k: t for s in manifest.shards for k, t in load(operator.store.get_bytes(s.adapter.key)).items()}
        assert set(stored) == {f"{m}.lora_R.weight" for m in modules} | head
        assert manifest.adapter_bytes == sum(t.numel() * 4 for t in stored.values())
    # a continuing client fetches R and the head only (it holds the frame): bytes independent of the clients
    cont = tmp_path / "continuing"
    operator.pull(fed, cont, 1)
    fetched = count_adapter_reads(operator.store)
    manifest = operator.pull(fed, cont, 2)
    p2 = load_file(held[2] / FED_SB_FILE)
    whole = sum(s.adapter.size for s in manifest.shards)
    r_bytes = sum(t.numel() * 4 for k, t in p2.items() if k.endswith(".lora_R.weight"))
    frame_bytes = sum(t.numel() * 4 for k, t in p2.items() if k.endswith((".lora_A.weight", ".lora_B.weight")))
    assert r_bytes == len(modules) * RANK * RANK * 4 and r_bytes < whole < frame_bytes
    assert fetched[0] == whole
    assert (cont / ADAPTER_WEIGHTS).read_bytes() == (held[2] / ADAPTER_WEIGHTS).read_bytes()
    assert (cont / FED_SB_FILE).read_bytes() == (held[2] / FED_SB_FILE).read_bytes()

    # export: a plain model with the exact PEFT model's logits
    from transformers import AutoModelForSequenceClassification

    exported = tmp_path / "exported"
    deployment.cli("export", "-f", fed, "--model", str(tiny_bert_dir), "--output", str(exported))
    tokenizer = load_tokenizer(tiny_bert_dir)
    texts = list(_data(0).texts[:8])
    want_logits = predict(exact_model(held[2], tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, texts)
    got_logits = predict(AutoModelForSequenceClassification.from_pretrained(exported).eval(), tokenizer, texts)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)

    # refusals, each clear, the open round unharmed
    r = 3
    m0 = modules[0]
    with_a = _r_upload(held[2], tmp_path / "bad-a", 99, extra={f"{m0}.lora_A.weight": p0[f"{m0}.lora_A.weight"]})
    with pytest.raises(InvalidAdapter, match="has lora_R and lora_A: a Fed-SB upload carries lora_R only"):
        operator.upload(fed, with_a, "c0", dataset_size=10.0, round_=r, timeout=120)  # refused before it leaves
    with pytest.raises(Rejected, match="has lora_R and lora_A: a Fed-SB upload carries lora_R only"):
        _submit_raw(operator, fed, "c0", r, with_a)  # a hostile client skips the SDK: ingest refuses the same
    ab = dict(peft0)  # a plain lora_A / lora_B upload
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(ab, str(plain / ADAPTER_WEIGHTS))
    (plain / "adapter_config.json").write_text((held[2] / "adapter_config.json").read_text())
    with pytest.raises(Rejected, match="this fed-sb federation trains lora_R only"):
        operator.upload(fed, plain, "c0", dataset_size=10.0, round_=r, timeout=120)
    config = json.loads((held[2] / "adapter_config.json").read_text())
    wrong = _r_upload(held[2], tmp_path / "bad-rank", 98, rank=2)
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 2, "lora_alpha": 4}))
    with pytest.raises(Rejected, match=r"lora_R is float32 \[4, 4\].*the upload's is F32 \[2, 2\]"):
        operator.upload(fed, wrong, "c0", dataset_size=10.0, round_=r, timeout=120)
    info = operator.round(fed, r)
    assert (str(info.state), info.n, info.trainable) == ("open", 0, "lora_R")


def test_fed_sb_train_two_rounds_exact_with_export(deployment, tiny_bert_dir, tmp_path):
    """``train`` (the SDK) trains R between the frozen frame; the uploads carry lora_R only; each round is the
    oracle's average; export gives the exact PEFT model's logits."""
    torch.set_num_threads(1)
    fed = "sbt"
    deployment.start_worker(concurrency=1)
    create_federation(deployment, fed, tiny_bert_dir, LABELS, "--strategy", "fed-sb", quorum=2, rank=RANK)
    operator = deployment.sdk()
    secrets = {c: operator.add_client(fed, c).secret for c in ("c0", "c1")}
    train_all(deployment, fed, secrets, _client_data, tmp_path, model_dir=tiny_bert_dir, rounds=2, **TRAINING)
    opened = [e for e in operator.state.events(fed).read() if e.type == "round_opened"]
    assert [e.get("trainable") for e in opened] == ["lora_R"] * 3
    assert operator.round(fed, 1).trainable == "lora_R"

    p0 = tmp_path / "g0"
    operator.pull(fed, p0, 0)
    frame = load_file(p0 / FED_SB_FILE)
    prev = frame
    for r in (1, 2):
        out = tmp_path / f"g{r}"
        operator.pull(fed, out, r)
        pub = load_file(out / FED_SB_FILE)
        records = operator.state.deltas(fed, r)
        uploads = {c: load(operator.store.get_bytes(records[c].key)) for c in records}
        weights = {e["client_id"]: e["weight"] for e in json.loads((out / "manifest.json").read_text())["clients"]}
        scaling = json.loads((out / "adapter_config.json").read_text())["lora_alpha"] / RANK
        for m in _modules(pub):
            assert all(not any(k.startswith((f"{m}.lora_A", f"{m}.lora_B")) for k in u) for u in uploads.values())
            b, a = frame[f"{m}.lora_B.weight"].to(F64), frame[f"{m}.lora_A.weight"].to(F64)
            assert torch.equal(pub[f"{m}.lora_B.weight"], frame[f"{m}.lora_B.weight"])
            want = sum(weights[c] * scaling * (b @ u[f"{m}.lora_R.weight"].to(F64) @ a) for c, u in uploads.items())
            got = scaling * b @ pub[f"{m}.lora_R.weight"].to(F64) @ a
            assert float((got - want).norm() / want.norm()) <= 1e-6, (r, m)
            assert not torch.equal(pub[f"{m}.lora_R.weight"], prev[f"{m}.lora_R.weight"])  # it trained
        prev = pub

    from transformers import AutoModelForSequenceClassification

    exported = tmp_path / "exported"
    deployment.cli("export", "-f", fed, "--model", str(tiny_bert_dir), "--output", str(exported))
    tokenizer = load_tokenizer(tiny_bert_dir)
    texts = list(_data(1).texts[:8])
    want_logits = predict(exact_model(tmp_path / "g2", tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, texts)
    got_logits = predict(AutoModelForSequenceClassification.from_pretrained(exported).eval(), tokenizer, texts)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)
