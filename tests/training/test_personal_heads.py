"""Personalised heads (``federation create --personal-heads``) through the in-process SDK (embedded Redis,
file:// store, eager workers): each client keeps its own task head across rounds and never uploads it, the
body is aggregated as before, every round publishes round 0's head, and ``export --head own`` gives the
model the client trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.adapters import model_decl_from_adapter
from chorus_mq.errors import ConfigError, IncompatibleDelta, InvalidAdapter, Rejected
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PERSONAL_HEAD_FILE, TRAIN_STATE_FILE, TaskType
from chorus_mq.state import FederationConfig
from chorus_mq.training.data import Examples
from chorus_mq.training.driver import train_federation
from chorus_mq.training.export import export_model
from chorus_mq.training.heads import PersonalHead, apply_head, head_state, own_head, split_head
from chorus_mq.training.local_round import evaluate, predict
from chorus_mq.training.model import PEFT_PREFIX, exact_model

from .common import seq_cls_initial
from .test_local import DATA

LABELS = ("awful", "great", "okay")
HEAD_KEYS = {f"{PEFT_PREFIX}classifier.weight", f"{PEFT_PREFIX}classifier.bias"}
#: two clients with opposite label skew: 3/4 of alice's examples are "awful", 3/4 of bob's "great"
ALICE = DATA.subset([i for i in range(48) if DATA.labels[i] == 0] + [i for i in range(48) if DATA.labels[i] != 0][:5])
BOB = DATA.subset([i for i in range(48) if DATA.labels[i] == 1] + [i for i in range(48) if DATA.labels[i] != 1][:5])
EVAL = DATA.subset(list(range(0, 48, 4)))
TEXTS = list(DATA.texts[:9])


@pytest.fixture
def sdk(tmp_path):
    from chorus_mq.simulate_synthetic import embedded_sdk
    from chorus_mq.workers import runtime

    yield embedded_sdk(tmp_path / "deployment")
    runtime.install(None)


@pytest.fixture
def initial(tiny_bert_dir, tmp_path) -> Path:
    return seq_cls_initial(tiny_bert_dir, tmp_path / "initial", LABELS)


def _create(sdk, initial: Path, name: str = "fed", *, personal: bool = True) -> dict[str, str]:
    config = FederationConfig(
        name=name, base_model="tiny-bert", quorum=1, task_type=TaskType.SEQ_CLS, labels=LABELS, personal_heads=personal
    )
    sdk.create_federation(config, model=model_decl_from_adapter(initial), initial_adapter=initial)
    return {c: sdk.add_client(name, c).secret for c in ("alice", "bob")}


def _train(sdk, secrets, client: str, data: Examples, model_dir, workdir, rounds: int, name: str = "fed"):
    sdk.secret = secrets[client]
    return list(
        train_federation(
            sdk,
            federation=name,
            client_id=client,
            model_dir=model_dir,
            data=data,
            workdir=workdir,
            rounds=rounds,
            eval_data=EVAL,
            steps_per_round=12,
            batch_size=8,
            lr=2e-2,
            max_length=32,
            balance_labels="off",
            json=True,
            timeout=60,
            poll=0.05,
        )
    )


def _published_head(pulled: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(pulled / ADAPTER_WEIGHTS)).items() if k in HEAD_KEYS}


def test_each_client_keeps_its_own_head_and_exports_what_it_trained(sdk, initial, tiny_bert_dir, tokenizer, tmp_path):
    secrets = _create(sdk, initial)
    assert sdk.status("fed").personal_heads
    work = {c: tmp_path / c for c in ("alice", "bob")}
    # quorum 1: alice completes round 1, bob round 2 (from round 1's body), alice round 3
    [a1] = _train(sdk, secrets, "alice", ALICE, tiny_bert_dir, work["alice"], 1)
    alice_after_1 = own_head(work["alice"], "fed")
    # killed after round 1 completed, before it adopted the head and recorded the round: the restart does both
    (work["alice"] / PERSONAL_HEAD_FILE).unlink()
    state = json.loads((work["alice"] / TRAIN_STATE_FILE).read_text())
    (work["alice"] / TRAIN_STATE_FILE).write_text(json.dumps({**state, "done": []}))
    assert _train(sdk, secrets, "alice", ALICE, tiny_bert_dir, work["alice"], 1) == []
    restored = own_head(work["alice"], "fed")
    assert restored.round == 1 and all(torch.equal(restored.tensors[k], alice_after_1.tensors[k]) for k in HEAD_KEYS)
    [b2] = _train(sdk, secrets, "bob", BOB, tiny_bert_dir, work["bob"], 1)
    [a3] = _train(sdk, secrets, "alice", ALICE, tiny_bert_dir, work["alice"], 2)
    assert (a1.round, b2.round, a3.round) == (1, 2, 3) and (b2.start_round, a3.start_round) == (1, 2)
    heads = {c: own_head(work[c], "fed") for c in ("alice", "bob")}
    assert (heads["alice"].round, heads["bob"].round) == (3, 2) and heads["alice"].client_id == "alice"
    initial_head = _published_head(initial)
    assert set(initial_head) == HEAD_KEYS

    # nothing of a head went up, and every round publishes round 0's head, bit for bit
    for r in (1, 2, 3):
        pulled = tmp_path / f"pulled{r}"
        manifest = sdk.pull("fed", pulled, r)
        published = _published_head(pulled)
        assert set(published) == HEAD_KEYS and all(torch.equal(published[k], initial_head[k]) for k in HEAD_KEYS)
        saved = json.loads((pulled / ADAPTER_CONFIG).read_text())["modules_to_save"]
        assert "classifier" in saved and saved == json.loads((initial / ADAPTER_CONFIG).read_text())["modules_to_save"]
        assert manifest.modules == 4  # the body (query, value of 2 layers) is aggregated as before
    for client, r in (("alice", 3), ("bob", 2)):
        uploaded = work[client] / "rounds" / f"{r:06d}" / "adapter"
        assert not HEAD_KEYS & set(load_file(str(uploaded / ADAPTER_WEIGHTS)))
        assert json.loads((uploaded / ADAPTER_CONFIG).read_text())["modules_to_save"] is None

    # the heads are per client: each moved from the initial one, and apart; alice's kept training across rounds
    def distance(a, b):
        return sum(float((a[k] - b[k]).norm()) for k in HEAD_KEYS)

    assert distance(heads["alice"].tensors, initial_head) > 1e-3 and distance(heads["bob"].tensors, initial_head) > 1e-3
    assert distance(heads["alice"].tensors, heads["bob"].tensors) > 1e-3
    assert distance(heads["alice"].tensors, alice_after_1.tensors) > 1e-3
    # train evaluated the body of the round with the client's own head (the model it trains on next)
    model = exact_model(tmp_path / "pulled3", tiny_bert_dir, task=TaskType.SEQ_CLS, labels=LABELS)
    apply_head(model, heads["alice"].tensors)
    score = evaluate(model, tokenizer, EVAL, task=TaskType.SEQ_CLS, max_length=128)
    assert a3.eval_loss == pytest.approx(score.loss, abs=1e-6) and a3.eval_accuracy == score.accuracy

    # bob's model as he trained it in round 2 (round 1's correction, his uploaded body, his head) is what
    # export of round 2 with his own head gives, as a plain transformers model
    from transformers import AutoModelForSequenceClassification

    trained_dir = tmp_path / "bob-trained"
    shutil.copytree(tmp_path / "pulled1", trained_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy(work["bob"] / "rounds" / "000002" / "adapter" / name, trained_dir / name)
    config = json.loads((trained_dir / ADAPTER_CONFIG).read_text())
    (trained_dir / ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    body = load_file(str(trained_dir / ADAPTER_WEIGHTS))
    from safetensors.torch import save_file

    save_file({**body, **heads["bob"].tensors}, str(trained_dir / ADAPTER_WEIGHTS), {"format": "pt"})
    want = predict(exact_model(trained_dir, tiny_bert_dir, task=TaskType.SEQ_CLS, labels=LABELS), tokenizer, TEXTS)
    out = export_model(
        tmp_path / "pulled2", tiny_bert_dir, tmp_path / "bob-export", task=TaskType.SEQ_CLS, head=heads["bob"].tensors
    )
    got = predict(AutoModelForSequenceClassification.from_pretrained(out).eval(), tokenizer, TEXTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    glob = export_model(tmp_path / "pulled2", tiny_bert_dir, tmp_path / "global-export", task=TaskType.SEQ_CLS)
    other = predict(AutoModelForSequenceClassification.from_pretrained(glob).eval(), tokenizer, TEXTS)
    assert float((other - got).abs().max()) > 1e-3  # the global head is another model


def test_a_personal_federation_refuses_a_delta_with_a_head_and_accepts_one_without(sdk, initial, tmp_path):
    secrets = _create(sdk, initial)
    with pytest.raises(Rejected, match=r"keeps every client's task head local \(--personal-heads\).*classifier"):
        sdk.upload("fed", initial, "alice", dataset_size=10, secret=secrets["alice"], timeout=30)
    assert sdk.status("fed").deltas == 0
    body = tmp_path / "body"
    shutil.copytree(initial, body)
    assert set(split_head(body)) == HEAD_KEYS
    result = sdk.upload("fed", body, "alice", dataset_size=10, secret=secrets["alice"], timeout=30)
    assert result.status in ("accepted", "fired")
    # a federation whose heads are averaged still needs every delta's head
    other = _create(sdk, initial, "shared", personal=False)
    with pytest.raises(Rejected, match="lacks the declared extra"):
        sdk.upload("shared", body, "alice", dataset_size=10, secret=other["alice"], timeout=30)


def test_personal_heads_need_a_seq_cls_head_and_round_0(sdk, initial, tiny_bert_dir):
    with pytest.raises(ConfigError, match="needs a seq-cls federation"):
        FederationConfig(name="f", base_model="m", quorum=1, task_type=TaskType.CAUSAL_LM, personal_heads=True)
    config = FederationConfig(
        name="f", base_model="m", quorum=1, task_type=TaskType.SEQ_CLS, labels=LABELS, personal_heads=True
    )
    with pytest.raises(ConfigError, match="needs an initial adapter"):
        sdk.create_federation(config, model=model_decl_from_adapter(initial))
    assert "f" not in sdk.state.federations()


def test_head_files_are_checked_and_heads_must_fit_the_model(initial, tiny_bert_dir, tmp_path):
    head = {k: v for k, v in load_file(str(initial / ADAPTER_WEIGHTS)).items() if k in HEAD_KEYS}
    path = PersonalHead(head, "fed", "alice", 4).save(tmp_path / PERSONAL_HEAD_FILE)
    back = PersonalHead.load(path)
    assert (back.federation, back.client_id, back.round) == ("fed", "alice", 4)
    assert all(torch.equal(back.tensors[k], head[k]) for k in HEAD_KEYS)
    with pytest.raises(ConfigError, match="belongs to federation 'fed', not 'other'"):
        own_head(tmp_path, "other")
    with pytest.raises(ConfigError, match="holds no task head"):
        own_head(tmp_path / "nowhere")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidAdapter, match="not a task head file"):
        PersonalHead.load(tmp_path / "junk.safetensors")
    model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS)
    assert set(head_state(model)) == HEAD_KEYS
    with pytest.raises(IncompatibleDelta, match="does not fit this model"):
        apply_head(model, {**head, f"{PEFT_PREFIX}score.weight": head[f"{PEFT_PREFIX}classifier.weight"]})


def test_a_round_in_many_shards_publishes_the_body_and_round_0s_head(initial, tiny_bert_dir, tokenizer, tmp_path):
    """Shards of one item each: the shard holding the head copies round 0's; the others aggregate the body."""
    from chorus_mq.simulate_synthetic import embedded_sdk
    from chorus_mq.workers import runtime

    sdk = embedded_sdk(tmp_path / "deployment", shard_bytes=1, max_shards=16)
    try:
        secrets = _create(sdk, initial)
        body = tmp_path / "body"
        model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
        with torch.no_grad():  # a body that differs from round 0's, and a head the workers must not see
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn_like(param))
        from chorus_mq.training.local_round import save_adapter

        save_adapter(model, body)
        split_head(body)
        sdk.upload("fed", body, "alice", dataset_size=10, secret=secrets["alice"], timeout=30)
        manifest = sdk.pull("fed", tmp_path / "r1", 1)
    finally:
        runtime.install(None)
    assert len(manifest.shards) == 6  # 4 LoRA modules and the head's 2 tensors, one per shard
    published = _published_head(tmp_path / "r1")
    initial_head = _published_head(initial)
    assert all(torch.equal(published[k], initial_head[k]) for k in HEAD_KEYS)
    # the round's model is the uploaded body with round 0's head
    want_dir = tmp_path / "want"
    shutil.copytree(body, want_dir)
    config = json.loads((want_dir / ADAPTER_CONFIG).read_text())
    (want_dir / ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    from safetensors.torch import save_file

    save_file({**load_file(str(body / ADAPTER_WEIGHTS)), **initial_head}, str(want_dir / ADAPTER_WEIGHTS))
    want = predict(exact_model(want_dir, tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, TEXTS)
    got = predict(exact_model(tmp_path / "r1", tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, TEXTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
