"""``export``: a plain transformers model whose logits equal the exact PEFT model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chorus_mq.errors import ConfigError
from chorus_mq.names import TaskType
from chorus_mq.training.export import export_model
from chorus_mq.training.model import exact_model

from .common import LABELS, TEXTS
from .pulled import logits, make_pulled


@pytest.mark.parametrize("kind", ["bert-seq-cls", "gpt2-causal-lm"])
def test_exported_model_loads_plainly_with_the_exact_logits(kind, tiny_bert_dir, tiny_gpt2_dir, tokenizer, tmp_path):
    arch, _, task_name = kind.partition("-")
    task = TaskType(task_name)
    model_dir, targets = (tiny_bert_dir, ("query", "value")) if arch == "bert" else (tiny_gpt2_dir, ("c_attn",))
    labels = LABELS if task == TaskType.SEQ_CLS else ()
    pulled = make_pulled(model_dir, tmp_path / "pulled", task=task, labels=labels, targets=targets)
    want = logits(exact_model(pulled, model_dir, task=task), tokenizer, TEXTS)
    out = export_model(pulled, model_dir, tmp_path / "out", task=task, labels=labels or None)
    auto = AutoModelForSequenceClassification if task == TaskType.SEQ_CLS else AutoModelForCausalLM
    plain = auto.from_pretrained(out).eval()
    assert not any("lora" in name for name in plain.state_dict())
    torch.testing.assert_close(logits(plain, tokenizer, TEXTS), want, rtol=0, atol=1e-5)
    if task == TaskType.SEQ_CLS:
        assert plain.config.id2label == dict(enumerate(LABELS))

    half = export_model(pulled, model_dir, tmp_path / "bf16", task=task, dtype="bfloat16", labels=labels or None)
    small = auto.from_pretrained(half, dtype=torch.bfloat16).eval()
    assert next(small.parameters()).dtype == torch.bfloat16
    assert (logits(small, tokenizer, TEXTS) - want).abs().max() < 0.1


def test_export_refuses_a_non_empty_output_and_unknown_dtypes(tiny_bert_dir, tmp_path):
    pulled = make_pulled(tiny_bert_dir, tmp_path / "pulled", task=TaskType.SEQ_CLS, labels=LABELS, targets=("query",))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_model(pulled, tiny_bert_dir, tmp_path / "busy", task=TaskType.SEQ_CLS)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="float32, bfloat16"):
        export_model(pulled, tiny_bert_dir, tmp_path / "x", task=TaskType.SEQ_CLS, dtype="float16")
