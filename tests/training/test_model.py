"""The initial adapter, the exact global model against a float64 oracle, and a client's start at its own rank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.errors import ConfigError, InvalidAdapter
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CUMULATIVE_FILE, TaskType
from chorus_mq.training.local_round import save_adapter
from chorus_mq.training.model import (
    build_initial_adapter,
    exact_model,
    fit_rank,
    load_base,
    read_adapter,
    start_model,
)

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
    pad = fit_rank(A, B, 2.0, fresh, 0.5)  # rank 8 >= 6: the global factors, rescaled, plus fresh rows
    assert pad.lost == 0.0 and pad.remainder is None
    assert torch.equal(pad.A[:6], A) and torch.equal(pad.A[6:], fresh[6:]) and not pad.B[:, 6:].any()
    torch.testing.assert_close(0.5 * pad.B.double() @ pad.A.double(), want)
    cut = fit_rank(A, B, 2.0, fresh[:3], 1.0)  # rank 3 < 6: Eckart-Young, and the rest as exact factors
    s = torch.linalg.svdvals(want)
    top = cut.B.double() @ cut.A.double()
    torch.testing.assert_close((want - top).norm(), s[3:].norm(), rtol=1e-5, atol=1e-8)
    assert cut.lost == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-6)
    left, right = cut.remainder
    assert left.shape == (12, 3) and right.shape == (3, 20)
    torch.testing.assert_close(top + left.double() @ right.double(), want, rtol=1e-5, atol=1e-5)


def test_a_client_below_the_global_rank_starts_and_uploads_exactly(tiny_bert_dir, tokenizer, tmp_path):
    pulled = make_pulled(
        tiny_bert_dir, tmp_path / "p", task=TaskType.SEQ_CLS, labels=LABELS, targets=("query", "value")
    )
    exact = logits(exact_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, TEXTS)
    wide = start_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=8, alpha=8.0, seed=1)
    assert wide.gap.modules == 4 and wide.gap.truncated == 0 and not wide.remainder
    torch.testing.assert_close(logits(wide.model, tokenizer, TEXTS), exact, rtol=0, atol=1e-5)

    narrow = start_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=2, alpha=4.0, seed=1)
    assert (
        narrow.gap.truncated == 4
        and 0 < narrow.gap.relative < 1
        and set(narrow.remainder) == set(read_adapter(pulled)[0])
    )
    torch.testing.assert_close(logits(narrow.model, tokenizer, TEXTS), exact, rtol=0, atol=1e-5)  # frozen, kept
    assert sum(p.numel() for n, p in narrow.model.named_parameters() if p.requires_grad and "lora_A" in n) == 4 * 2 * 32
    with torch.no_grad():  # as if trained: move the trainable factors
        for name, p in narrow.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(0.05)
    trained = logits(narrow.model, tokenizer, TEXTS)
    upload = save_adapter(narrow.model, tmp_path / "upload", remainder=narrow.remainder)
    assert json.loads((upload / ADAPTER_CONFIG).read_text())["r"] == 4  # the global rank: 2 trained + 2 frozen
    shutil.copy(pulled / CUMULATIVE_FILE, upload / CUMULATIVE_FILE)  # the client's model: base + correction + upload
    torch.testing.assert_close(
        logits(exact_model(upload, tiny_bert_dir, task=TaskType.SEQ_CLS), tokenizer, TEXTS), trained, rtol=0, atol=1e-5
    )  # the upload is the client's whole model

    dropped = start_model(pulled, tiny_bert_dir, task=TaskType.SEQ_CLS, rank=2, alpha=4.0, seed=1, keep_remainder=False)
    assert not dropped.remainder and not dropped.gap.kept
    assert (logits(dropped.model, tokenizer, TEXTS) - exact).abs().max() > 1e-4


def test_models_loaded_in_threads_leave_transformers_intact(tiny_gpt2_dir):
    """Clients trained in threads of one process load at once; transformers' loader swaps process-wide functions.

    Without the load lock one such race left ``PreTrainedModel.tie_weights`` a no-op for the rest of the
    process, and every later GPT-2 loaded with an uninitialised ``lm_head`` (losses of 2e23 in CI).
    """
    import threading

    from transformers import PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(15):
                load_base(tiny_gpt2_dir, TaskType.CAUSAL_LM)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert PreTrainedModel.tie_weights is tie_weights
    model = load_base(tiny_gpt2_dir, TaskType.CAUSAL_LM)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.isfinite(model.lm_head.weight).all()
