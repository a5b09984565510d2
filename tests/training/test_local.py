"""Local LoRA training lowers the loss (seq-cls and causal-lm), and saves an adapter ready for upload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chorus_mq.adapters import load_adapter
from chorus_mq.errors import ConfigError
from chorus_mq.names import TaskType
from chorus_mq.training.data import Examples
from chorus_mq.training.local_round import TrainConfig, evaluate, predict, save_adapter, train_local
from chorus_mq.training.model import exact_model, start_model

from .common import LABELS, seq_cls_initial

# a learnable toy task: the label is which of three words the text contains
WORDS = ("awful", "great", "okay")
DATA = Examples(
    tuple(f"the film was {WORDS[i % 3]} {'really ' * (i % 4)}overall" for i in range(48)),
    tuple(i % 3 for i in range(48)),
)


def data_csv(path: Path, copies: int = 2) -> Path:
    """DATA as a ``simulate --dataset`` CSV: ``copies`` copies, each text tagged with its copy, labels as words."""
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    rows = [
        {"text": f"{t} #{c}", "label": WORDS[y]}
        for c in range(copies)
        for t, y in zip(DATA.texts, DATA.labels, strict=True)
    ]
    pa_csv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def test_seq_cls_training_lowers_the_loss_and_saves_an_uploadable_adapter(tiny_bert_dir, tokenizer, tmp_path):
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0")
    model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
    before = evaluate(model, tokenizer, DATA, task=TaskType.SEQ_CLS)
    config = TrainConfig(task=TaskType.SEQ_CLS, steps=40, batch_size=8, lr=1e-2, max_length=32, seed=0)
    result = train_local(model, tokenizer, DATA, config)
    after = evaluate(model, tokenizer, DATA, task=TaskType.SEQ_CLS)
    assert result.steps == 40 and result.examples == 48
    assert after.loss < before.loss - 0.1 and after.accuracy > before.accuracy + 0.2
    out = save_adapter(model, tmp_path / "trained")
    local = load_adapter(out)  # what `sdk.upload` validates before anything leaves the machine
    assert len(local.spec.target_modules) == 2
    assert any(k.endswith("classifier.weight") for k in local.tensors)
    # the saved adapter is the trained model: reloading it gives the same logits
    texts = list(DATA.texts[:6])
    reloaded = exact_model(out, tiny_bert_dir, task=TaskType.SEQ_CLS)
    torch.testing.assert_close(predict(reloaded, tokenizer, texts), predict(model, tokenizer, texts))


def test_causal_lm_training_lowers_the_loss(tiny_gpt2_dir, tokenizer):
    start = start_model(None, tiny_gpt2_dir, task=TaskType.CAUSAL_LM, rank=4, alpha=8.0, seed=0)
    assert start.gap.truncated == 0 and not start.remainder
    model = start.model
    texts = Examples(tuple("one two three four five six seven eight" for _ in range(16)))
    before = evaluate(model, tokenizer, texts, task=TaskType.CAUSAL_LM)
    train_local(model, tokenizer, texts, TrainConfig(task=TaskType.CAUSAL_LM, steps=30, batch_size=4, lr=5e-2))
    after = evaluate(model, tokenizer, texts, task=TaskType.CAUSAL_LM)
    assert after.loss < before.loss - 0.2 and after.accuracy > before.accuracy + 0.1, (before, after)


def test_seq_cls_without_an_initial_adapter_is_refused(tiny_bert_dir):
    with pytest.raises(ConfigError, match="initial adapter"):
        start_model(None, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=4, labels=LABELS)


def test_train_config_refuses_contradictions():
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(steps=3, epochs=1.0)
    assert TrainConfig(epochs=2.0, batch_size=8).planned_steps(20) == 5
    assert TrainConfig(batch_size=8).sample_rate(20) == 0.4


def test_balanced_labels_learn_the_classes_rather_than_a_skewed_clients_prior(tiny_bert_dir, tokenizer, tmp_path):
    """A client with 16 examples of class 1 and 2 of each other class: logit adjustment does better on balanced data."""
    from chorus_mq.training.local_round import label_log_prior

    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0")
    others = [i for i, y in enumerate(DATA.labels) if y != 1]
    skewed = DATA.subset([i for i, y in enumerate(DATA.labels) if y == 1] + others[:2] + others[-2:])
    assert sorted(skewed.labels).count(1) == 16
    scores = {}
    for balance in (False, True):
        model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
        train_local(
            model,
            tokenizer,
            skewed,
            TrainConfig(task=TaskType.SEQ_CLS, steps=40, batch_size=8, lr=1e-2, max_length=32, balance_labels=balance),
        )
        scores[balance] = evaluate(model, tokenizer, DATA, task=TaskType.SEQ_CLS)
    assert scores[True].accuracy > scores[False].accuracy + 0.1, scores
    counts = torch.tensor([2.0, 16.0, 2.0]) + 1.0
    torch.testing.assert_close(label_log_prior(skewed, model), (counts / counts.sum()).log())


def test_fedprox_keeps_local_training_near_the_rounds_start(tiny_bert_dir, tokenizer, tmp_path):
    """The proximal pull shrinks how far the trainable parameters move; mu = 0 is plain training, bit for bit."""
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0")

    def moved(mu: float) -> tuple[float, list[torch.Tensor]]:
        model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        config = TrainConfig(task=TaskType.SEQ_CLS, steps=20, batch_size=8, lr=1e-2, max_length=32, prox_mu=mu)
        train_local(model, tokenizer, DATA, config)
        end = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return sum(float((a - b).square().sum()) for a, b in zip(end, start, strict=True)) ** 0.5, end

    plain, plain_params = moved(0.0)
    again, again_params = moved(0.0)
    assert plain == again and all(torch.equal(a, b) for a, b in zip(plain_params, again_params, strict=True))
    pulled, _ = moved(20.0)  # lr x mu = 0.2 per step
    assert 0 < pulled < 0.7 * plain, (pulled, plain)
    with pytest.raises(ConfigError, match="prox-mu"):
        TrainConfig(lr=1e-2, prox_mu=100.0)  # lr x mu >= 1 would overshoot the anchor
    with pytest.raises(ConfigError, match="prox-mu"):
        TrainConfig(prox_mu=-1.0)


def test_labels_are_balanced_by_default_only_where_they_are_skewed():
    from chorus_mq.names import LabelBalance
    from chorus_mq.training.local_round import label_skew, should_balance

    assert label_skew([0, 1] * 10, 2) == 0.0
    assert label_skew([1] * 10, 2) == pytest.approx(0.5)
    assert label_skew([0] * 82 + [1] * 18, 2) == pytest.approx(0.32)
    assert label_skew([0, 1, 2] * 4 + [2] * 6, 3) == pytest.approx(2 / 9)  # 4, 4, 10 of 18
    skewed = Examples(("t",) * 10, (0,) * 8 + (1,) * 2)
    even = Examples(("t",) * 10, (0, 1) * 5)
    seq = TaskType.SEQ_CLS
    assert should_balance(LabelBalance.AUTO, skewed, 2, seq, private=False)
    assert not should_balance("auto", even, 2, seq, private=False)
    assert not should_balance("auto", skewed, 2, seq, private=True)  # DP: the counts are not private
    assert not should_balance("auto", skewed, 2, TaskType.CAUSAL_LM, private=False)
    assert should_balance("on", even, 2, seq, private=False)
    assert not should_balance("off", skewed, 2, seq, private=False)
