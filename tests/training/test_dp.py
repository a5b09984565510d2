"""Client-side DP-SGD: Opacus clips each example's gradient, the ledger reports the accountant's epsilon."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from chorus_mq.errors import ConfigError
from chorus_mq.names import TaskType
from chorus_mq.training.dp import DPConfig, PrivacyLedger, make_private
from chorus_mq.training.local_round import TrainConfig, encode, example_losses, train_local
from chorus_mq.training.model import exact_model

from .common import seq_cls_initial
from .test_local import DATA


@pytest.fixture
def trainable(tiny_bert_dir, tmp_path):
    initial = seq_cls_initial(tiny_bert_dir, tmp_path / "r0")
    model = exact_model(initial, tiny_bert_dir, task=TaskType.SEQ_CLS, trainable=True)
    with torch.no_grad():  # B = 0 at round 0 would leave A without gradients: make every factor matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _loss(module, tokenizer, idx):
    inputs = encode(tokenizer, [DATA.texts[i] for i in idx], 32)
    labels = torch.tensor([DATA.labels[i] for i in idx])
    return example_losses(module(**inputs).logits, inputs, labels, TaskType.SEQ_CLS)[0].mean()


def test_each_example_is_clipped_before_averaging(trainable, tokenizer):
    """One DP step without noise moves the parameters by -lr * Σ clip(g_i) / batch: per example, not per batch."""
    idx, clip = [0, 1, 2, 3], 0.05
    reference = copy.deepcopy(trainable)
    params = [p for p in reference.parameters() if p.requires_grad]
    clipped_sum = [torch.zeros_like(p) for p in params]
    norms = []
    for i in idx:  # each example's own gradient, computed one at a time
        grads = torch.autograd.grad(_loss(reference, tokenizer, [i]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        for acc, g in zip(clipped_sum, grads, strict=True):
            acc += g * min(1.0, clip / float(norm))
    assert min(norms) > clip  # clipping is active for every example

    before = [p.detach().clone() for p in trainable.parameters() if p.requires_grad]
    private = make_private(
        trainable,
        torch.optim.SGD([p for p in trainable.parameters() if p.requires_grad], lr=1.0),
        noise_multiplier=0.0,
        clip=clip,
        sample_rate=1.0,
        n=len(idx),
        seed=0,
    )
    _loss(private.module, tokenizer, idx).backward()
    private.optimizer.step()
    private.close()
    after = [p.detach() for p in trainable.parameters() if p.requires_grad]
    for b, a, s in zip(before, after, clipped_sum, strict=True):
        torch.testing.assert_close(b - a, s / len(idx), rtol=1e-4, atol=1e-6)
    # without per-example clipping the step would have been the (much larger) plain mean gradient
    total = torch.sqrt(sum(((b - a) ** 2).sum() for b, a in zip(before, after, strict=True)))
    assert float(total) <= clip + 1e-6


def test_ledger_reports_the_accountants_epsilon_cumulatively(tmp_path):
    config = DPConfig(epsilon=3.0, delta=1e-5, clip=1.0)
    q, steps = 0.1, 20
    ledger = PrivacyLedger.open(tmp_path / "privacy.json", config, sample_rate=q, planned_steps=2 * steps)
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=2 * steps, accountant="rdp"
    )
    assert ledger.noise_multiplier == pytest.approx(sigma)
    first = ledger.report(1, steps)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert first.epsilon == pytest.approx(acc.get_epsilon(1e-5)) and first.steps == steps
    ledger.commit(1, steps)
    ledger.commit(1, steps)  # a re-upload of round 1 is the same release
    again = PrivacyLedger.open(tmp_path / "privacy.json", config, sample_rate=q, planned_steps=2 * steps)
    second = again.report(2, steps)
    assert second.steps == 2 * steps and first.epsilon < second.epsilon <= 3.0 * 1.02
    assert second.epsilon == pytest.approx(3.0, rel=0.02)  # the whole plan spends the budget
    again.commit(2, steps)
    with pytest.raises(ConfigError, match="over its budget"):
        again.report(3, steps)
    with pytest.raises(ConfigError, match="cannot continue"):
        PrivacyLedger.open(tmp_path / "privacy.json", DPConfig(epsilon=8.0), sample_rate=q, planned_steps=40)
    with pytest.raises(ConfigError, match="dp-delta"):
        DPConfig(epsilon=1.0, delta=2.0)


def test_private_training_runs_and_leaves_a_plain_peft_model(trainable, tokenizer):
    before = {n: p.detach().clone() for n, p in trainable.named_parameters() if p.requires_grad}
    config = TrainConfig(task=TaskType.SEQ_CLS, steps=6, batch_size=8, lr=1e-2, max_length=32)
    result = train_local(trainable, tokenizer, DATA, config, privacy=(1.1, 1.0), dp_seed=0)
    assert result.steps == 6
    changed = [n for n, p in trainable.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # noise reaches every trainable parameter
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in trainable.parameters())
    assert type(trainable).__name__.startswith("PeftModel")  # no Opacus wrapper left behind


def test_an_empty_poisson_batch_is_still_a_noisy_step():
    """Poisson sampling can draw no example; the step then releases noise only (what the accountant counts)."""
    layer = torch.nn.Linear(3, 2)
    private = make_private(
        layer,
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=1.0,
        clip=1.0,
        sample_rate=0.25,
        n=4,
        seed=0,
    )
    before = [p.detach().clone() for p in layer.parameters()]
    private.empty_step()
    private.optimizer.step()
    private.close()
    moved = [float((b - p).abs().max()) for b, p in zip(before, layer.parameters(), strict=True)]
    assert all(m > 0 for m in moved)


def test_label_balancing_is_refused_under_dp(trainable, tokenizer):
    config = TrainConfig(task=TaskType.SEQ_CLS, steps=1, batch_size=8, balance_labels=True)
    before = {n: p.detach().clone() for n, p in trainable.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match="DP-SGD does not protect"):
        train_local(trainable, tokenizer, DATA, config, privacy=(1.0, 1.0))
    assert all(torch.equal(p, before[n]) for n, p in trainable.named_parameters() if p.requires_grad)
