"""The initial adapter, the exact global model against a float64 oracle, and a client's start at its own rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.errors import ConfigError, InvalidAdapter
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TaskType
from chorus_mq.training.model import build_initial_adapter, exact_model, fit_rank, load_base, start_model

from .common import LABELS, TEXTS
from .pulled import logits, make_pulled, oracle_model


def test_initial_adapter_is_byte_identical_for_a_seed_and_carries_the_head(tiny_bert_dir, tmp_path):
    kwargs = {"task": TaskType.SEQ_CLS, "labels": LABELS, "target_modules": ("query", "value"), "rank": 4, "seed": 7}
    one = build_initial_adapter(tiny_bert_dir, tmp_path / "one", **kwargs)
    two = build_initial_adapter(tiny_bert_dir, tmp_path / "two", **kwargs)
    other = build_initial_adapter(tiny_bert_dir, tmp_path / "other", **{**kwargs, "seed": 8})
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    assert (one / ADAPTER_WEIGHTS).read_bytes() != (other / ADAPTER_WEIGHTS).read_bytes()
    tensors = load_file(one / ADAPTER_WEIGHTS)
    assert tensors["base_model.model.classifier.weight"].shape == (len(LABELS), 32)
    assert not any(t.any() for k, t in tensors.items() if k.endswith("lora_B.weight"))  # the start is the base
    assert all(t.any() for k, t in tensors.items() if k.endswith("lora_A.weight"))
    config = json.loads((one / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["query", "value"] and config["modules_to_save"] == ["classifier", "score"]
    assert config["base_model_name_or_path"] == tiny_bert_dir.name  # no party's local path


def test_initial_adapter_needs_labels_for_seq_cls(tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="at least two labels"):
        build_initial_adapter(tiny_bert_dir, tmp_path / "a", task=TaskType.SEQ_CLS, labels=("only",))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["bert-seq-cls", "gpt2-causal-lm", "gpt2-seq-cls"])
def test_exact_model_equals_base_plus_residual_plus_adapter(kind, tiny_bert_dir, tiny_gpt2_dir, tokenizer, tmp_path):
    """Linear (BERT) and Conv1D (GPT-2, fan_in_fan_out) layers, with and without a task head."""
    arch, _, task_name = kind.partition("-")
    task = TaskType(task_name)
    model_dir, targets = (tiny_bert_dir, ("query", "value")) if arch == "bert" else (tiny_gpt2_dir, ("c_attn",))
    labels = LABELS if task == TaskType.SEQ_CLS else ()
    pulled = make_pulled(model_dir, tmp_path / "pulled", task=task, labels=labels, targets=targets)
    model = exact_model(pulled, model_dir, task=task)
    base = load_base(model_dir, task, labels=labels or None)
    want = logits(oracle_model(base, pulled, fan_in_fan_out=arch == "gpt2"), tokenizer, TEXTS, torch.float64)
    got = logits(model, tokenizer, TEXTS, torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and each part matters: without the residual the logits are measurably different
    without_residual = make_pulled(
        model_dir, tmp_path / "no-residual", task=task, labels=labels, targets=targets, residual_scale=0.0
    )
    plain = logits(exact_model(without_residual, model_dir, task=task), tokenizer, TEXTS, torch.float64)
    assert (plain - want).abs().max() > 1e-3


def test_exact_model_is_trainable_only_when_asked(tiny_bert_dir, tmp_path):
    pulled = make_pulled(tiny_bert_dir, tmp_path / "p", task=TaskType.SEQ_CLS, labels=LABELS, targets=("query",))
    frozen = exact_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = exact_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("classifier.modules_to_save" in n for n in names)
    assert not any("query.base_layer" in n for n in names)


def test_exact_model_refuses_an_adapter_for_another_model(tiny_bert_dir, tiny_gpt2_dir, tmp_path):
    pulled = make_pulled(tiny_gpt2_dir, tmp_path / "p", task=TaskType.CAUSAL_LM, targets=("c_attn",))
    (pulled / "cumulative_residual.safetensors").unlink()
    with pytest.raises((InvalidAdapter, ValueError)):
        exact_model(pulled, tiny_bert_dir, task=TaskType.CAUSAL_LM)


def test_fit_rank_pads_exactly_and_truncates_to_the_best_approximation():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 20, generator=gen), torch.randn(12, 6, generator=gen)
    want = 2.0 * B.double() @ A.double()
    fresh = torch.randn(8, 20, generator=gen)
    a8, b8, lost = fit_rank(A, B, 2.0, fresh, 0.5)  # rank 8 >= 6: the global factors, rescaled, plus fresh rows
    assert lost == 0.0 and torch.equal(a8[:6], A) and torch.equal(a8[6:], fresh[6:]) and not b8[:, 6:].any()
    torch.testing.assert_close(0.5 * b8.double() @ a8.double(), want)
    a3, b3, lost3 = fit_rank(A, B, 2.0, fresh[:3], 1.0)  # rank 3 < 6: Eckart-Young
    s = torch.linalg.svdvals(want)
    best = (want - 1.0 * b3.double() @ a3.double()).norm()
    torch.testing.assert_close(best, s[3:].norm(), rtol=1e-5, atol=1e-8)
    assert lost3 == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-6)


def test_start_model_at_a_larger_rank_starts_exactly_from_the_global_model(tiny_bert_dir, tokenizer, tmp_path):
    pulled = make_pulled(
        tiny_bert_dir, tmp_path / "p", task=TaskType.SEQ_CLS, labels=LABELS, targets=("query", "value")
    )
    exact = logits(exact_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, TEXTS)
    model, gap = start_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=8, alpha=8.0, seed=1)
    assert gap.modules == 4 and gap.truncated == 0
    torch.testing.assert_close(logits(model, tokenizer, TEXTS), exact, rtol=0, atol=1e-5)
    small, small_gap = start_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=2, alpha=4.0, seed=1)
    assert small_gap.truncated == 4 and 0 < small_gap.relative < 1
    assert (logits(small, tokenizer, TEXTS) - exact).abs().max() > 1e-4
