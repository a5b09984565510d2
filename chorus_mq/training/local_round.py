"""A client's local round: LoRA training (seq-cls or causal-lm), evaluation, and the adapter it uploads."""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, DataError
from chorus_mq.names import ADAPTER_CONFIG, DEFAULT_LOCAL_LR, SKEWED_LABELS, LabelBalance, LocalOptimizer, TaskType

from .data import Examples
from .dp import PrivateTraining, make_private
from .model import normalise_adapter_config, read_adapter

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

#: examples sorted by length inside windows of this many batches: padding is most of the CPU cost otherwise
_LENGTH_WINDOW = 32


@dataclass(frozen=True)
class TrainConfig:
    """How a client trains each round (``--steps-per-round`` or ``--epochs``, batch size, lr, ...)."""

    task: TaskType = TaskType.SEQ_CLS
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    lr: float = DEFAULT_LOCAL_LR
    max_length: int = 128
    seed: int = 0
    progress: bool = False
    optimizer: LocalOptimizer = LocalOptimizer.ADAMW
    #: seq-cls: train on logits shifted by the log of this client's label frequencies (logit adjustment), so
    #: that a client with skewed labels learns the classes rather than its own prior
    balance_labels: bool = False
    #: FedProx: after each step, pull the trainable parameters toward the round's start by ``lr * prox_mu``
    #: times their distance (the proximal term's gradient, decoupled from the optimizer like AdamW's decay)
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", TaskType(self.task))
        object.__setattr__(self, "optimizer", LocalOptimizer(self.optimizer))
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps-per-round or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps-per-round must be positive, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("--batch-size must be positive and --max-length at least 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not (self.prox_mu >= 0 and math.isfinite(self.prox_mu)) or self.lr * self.prox_mu >= 1:
            raise ConfigError(f"--prox-mu must be >= 0 with lr x mu below 1, got {self.prox_mu} (lr {self.lr})")

    def planned_steps(self, n: int) -> int:
        """Steps per round on ``n`` examples (one epoch when neither steps nor epochs is given)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * n / self.batch_size))

    def sample_rate(self, n: int) -> float:
        """Each example's chance to be in a DP batch: the expected batch size is ``batch_size``."""
        return min(1.0, self.batch_size / n)


@dataclass(frozen=True)
class LocalResult:
    """One round of local training."""

    steps: int
    examples: int
    loss: float  # mean training loss over the round's steps
    first_loss: float
    last_loss: float
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float  # seq-cls: label accuracy; causal-lm: next-token accuracy
    examples: int


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, truncated to ``max_length`` and padded to its longest text."""
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    # single-segment text: BERT's default token types are these zeros, and GPT-2 would add an embedding for them
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def example_losses(
    logits: torch.Tensor, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None, task: TaskType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss and per-example correct fraction (label, or next tokens for causal-lm)."""
    import torch
    from torch.nn import functional

    if task == TaskType.SEQ_CLS:
        assert labels is not None
        return functional.cross_entropy(logits, labels, reduction="none"), (logits.argmax(-1) == labels).float()
    # the mean over each text's own tokens: an example's weight does not depend on its batch-mates
    mask = inputs["attention_mask"][:, 1:].to(logits.dtype)
    targets = inputs["input_ids"][:, 1:]
    shifted = logits[:, :-1]
    tokens = functional.cross_entropy(shifted.transpose(1, 2), targets, reduction="none")
    count = mask.sum(1).clamp(min=1)
    correct = ((shifted.argmax(-1) == targets).to(logits.dtype) * mask).sum(1) / count
    return (tokens * mask).sum(1) / count, correct.detach().to(torch.float32)


def batches(examples: Examples, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Shuffled batches, epoch after epoch; inside windows of batches, examples of similar length go together."""
    n = len(examples)
    window = batch_size * _LENGTH_WINDOW
    while True:
        order = list(range(n))
        rng.shuffle(order)
        epoch: list[list[int]] = []
        for start in range(0, n, window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples.texts[i]))
            epoch.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        rng.shuffle(epoch)
        yield from epoch


def _labels(examples: Examples, idx: list[int], task: TaskType) -> torch.Tensor | None:
    import torch

    if task != TaskType.SEQ_CLS:
        return None
    if examples.labels is None:
        raise DataError("seq-cls training needs labelled examples (--label-column)")
    return torch.tensor([examples.labels[i] for i in idx])


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not (enabled and sys.stderr.isatty()))


def train_local(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Examples,
    config: TrainConfig,
    *,
    privacy: tuple[float, float] | None = None,
    dp_seed: int | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train the model's trainable parameters (LoRA and the head) for one round; the model ends in eval mode.

    ``privacy`` is ``(noise_multiplier, clip)``: DP-SGD with Poisson batches at
    ``config.sample_rate``; the caller accounts for the steps (see :mod:`.dp`). ``correction``
    (SCAFFOLD's ``c - c_i``, by adapter-file key, see :mod:`.scaffold`): after each step every
    trained tensor moves by ``-lr`` times it.
    """
    import torch

    if not len(examples):
        raise DataError("no training examples")
    steps = config.planned_steps(len(examples))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters (load the adapter with trainable=True)")
    if privacy is not None and config.balance_labels:
        raise ConfigError(
            "--balance-labels uses this client's exact label counts, which DP-SGD does not protect: "
            "use one or the other"
        )
    forward, optimizer, stream, private = _optimiser(model, trainable, examples, config, privacy, dp_seed)
    prior = label_log_prior(examples, model) if config.balance_labels and config.task == TaskType.SEQ_CLS else None
    # FedProx's anchor: where this round started (the global model), for the trainable parameters only
    anchor = [p.detach().clone() for p in trainable] if config.prox_mu else None
    drift = _aligned(model, correction) if correction is not None else None
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), _progress(steps, config.progress, "train") as bar:
            torch.manual_seed(config.seed)  # dropout masks, without touching the caller's generator
            for idx in islice(stream, steps):
                if idx:
                    losses.append(_backward(forward, tokenizer, examples, idx, config, prior))
                elif private is not None:
                    private.empty_step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if anchor is not None:
                    _proximal_pull(trainable, anchor, config.lr * config.prox_mu)
                if drift is not None:
                    _corrected(drift, config.lr)
                bar.update(1)
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if private is not None:
            private.close()
        model.eval()
    if not losses or not all(math.isfinite(v) for v in losses):
        raise ConfigError(f"training diverged (losses {losses[-3:]}): lower --lr")
    return LocalResult(
        steps, len(examples), sum(losses) / len(losses), losses[0], losses[-1], time.perf_counter() - started
    )


def _optimiser(
    model: PeftModel,
    trainable: list[torch.nn.Parameter],
    examples: Examples,
    config: TrainConfig,
    privacy: tuple[float, float] | None,
    dp_seed: int | None,
) -> tuple[Any, torch.optim.Optimizer, Iterator[list[int]], PrivateTraining | None]:
    """What the steps run through: the model to call, the optimiser, the batches (lists of example indices)
    and, under DP-SGD (``privacy``), the private training that wraps all three (Poisson batches)."""
    import torch

    optimizer: torch.optim.Optimizer
    if config.optimizer == LocalOptimizer.SGD:
        optimizer = torch.optim.SGD(trainable, lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    if privacy is None:
        return model, optimizer, batches(examples, config.batch_size, random.Random(config.seed)), None
    sigma, clip = privacy
    private = make_private(
        model,
        optimizer,
        noise_multiplier=sigma,
        clip=clip,
        sample_rate=config.sample_rate(len(examples)),
        n=len(examples),
        seed=dp_seed,
    )
    return private.module, private.optimizer, private.batches(), private


def _backward(
    forward: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Examples,
    idx: list[int],
    config: TrainConfig,
    prior: torch.Tensor | None,
) -> float:
    """One batch's mean loss (logits shifted by the label prior when balancing), its gradients accumulated."""
    import torch

    inputs = encode(tokenizer, [examples.texts[i] for i in idx], config.max_length)
    logits = forward(**inputs).logits
    if prior is not None:
        logits = logits + prior
    per_example, _ = example_losses(logits, inputs, _labels(examples, idx, config.task), config.task)
    loss = per_example.mean()
    torch.autograd.backward(loss)
    return float(loss.detach())


def _proximal_pull(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rate: float) -> None:
    """``p <- p - rate * (p - p0)``: one step on FedProx's ``mu/2 ||p - p0||^2`` with step ``lr``."""
    import torch

    with torch.no_grad():
        for p, p0 in zip(params, anchor, strict=True):
            p.lerp_(p0, rate)


def _aligned(model: Any, correction: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its correction) for every trained tensor; the correction must cover each exactly."""
    from .scaffold import trained_tensors

    params = trained_tensors(model)
    if set(params) != set(correction):
        missing = sorted(set(params) ^ set(correction))
        raise ConfigError(f"the SCAFFOLD correction does not match the trained tensors (first: {missing[0]!r})")
    pairs = []
    for key, p in params.items():
        c = correction[key]
        if c.shape != p.shape:
            raise ConfigError(f"the SCAFFOLD correction of {key!r} has shape {tuple(c.shape)}, not {tuple(p.shape)}")
        pairs.append((p, c.to(p.dtype)))
    return pairs


def _corrected(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
    """``p <- p - lr (c - c_i)``: SCAFFOLD's correction of one step, decoupled from the optimizer."""
    import torch

    with torch.no_grad():
        for p, c in pairs:
            p.sub_(c, alpha=lr)


def label_skew(labels: Sequence[int], num_labels: int) -> float:
    """Total variation distance between the labels' frequencies and uniform (0: balanced; near 1: one class)."""
    if not labels or num_labels < 2:
        return 0.0
    counts = Counter(labels)
    n = len(labels)
    return 0.5 * sum(abs(counts.get(k, 0) / n - 1 / num_labels) for k in range(num_labels))


def should_balance(
    option: LabelBalance | str, examples: Examples, num_labels: int, task: TaskType, *, private: bool
) -> bool:
    """Whether a client balances its labels: ``on``/``off`` as asked; ``auto`` for skewed seq-cls data, not
    under DP (logit adjustment uses the exact label counts, which DP-SGD does not protect)."""
    option = LabelBalance(option)
    if option != LabelBalance.AUTO:
        return option == LabelBalance.ON
    if task != TaskType.SEQ_CLS or private or examples.labels is None:
        return False
    return label_skew(examples.labels, num_labels) >= SKEWED_LABELS


def label_log_prior(examples: Examples, model: Any) -> torch.Tensor:
    """log of the examples' label frequencies (add-one smoothed), one entry per class of the model's head."""
    import torch

    if examples.labels is None:
        raise DataError("balancing labels needs labelled examples")
    counts = torch.bincount(torch.tensor(examples.labels), minlength=int(model.config.num_labels)).double() + 1.0
    return (counts / counts.sum()).log().float()


def evaluate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Examples,
    *,
    task: TaskType,
    batch_size: int = 64,
    max_length: int = 128,
) -> Evaluation:
    """Mean loss and accuracy over ``examples`` (the model is left in eval mode)."""
    import torch

    task = TaskType(task)
    model.eval()
    total_loss = total_correct = 0.0
    order = sorted(range(len(examples)), key=lambda i: len(examples.texts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = encode(tokenizer, [examples.texts[i] for i in idx], max_length)
            losses, correct = example_losses(model(**inputs).logits, inputs, _labels(examples, idx, task), task)
            total_loss += float(losses.sum())
            total_correct += float(correct.sum())
    n = max(1, len(examples))
    return Evaluation(total_loss / n, total_correct / n, len(examples))


def predict(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """The model's logits for ``texts`` in their order (seq-cls: ``(n, labels)``; causal-lm: last position)."""
    import torch

    model.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            inputs = encode(tokenizer, texts[start : start + batch_size], max_length)
            logits = model(**inputs).logits
            if logits.ndim == 3:  # causal-lm: the logits after each text's last real token
                last = inputs["attention_mask"].sum(1) - 1
                logits = logits[torch.arange(logits.shape[0]), last]
            out.append(logits.float())
    return torch.cat(out) if out else torch.empty(0)


def save_adapter(
    model: PeftModel,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    remainder: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Save the trained adapter (LoRA + head) into ``out_dir``, ready for ``sdk.upload``.

    ``remainder`` (from :class:`~.model.Start`) is the frozen part of the global update this
    client kept in its base: appended to each module's factors, the upload is the client's whole
    model (``[s·B | left] @ [A ; right]`` with scaling 1).
    """
    import torch

    from chorus_mq.adapters import LoraSpec, write_peft_adapter

    out = Path(out_dir)
    if not remainder:
        model.save_pretrained(str(out), save_embedding_layers=False)
        normalise_adapter_config(out, base_model=base_model)
        return out
    with tempfile.TemporaryDirectory(prefix="chorus-adapter-") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        factors, head, _targets = read_adapter(Path(tmp))
        spec = LoraSpec.from_peft_config(json.loads((Path(tmp) / ADAPTER_CONFIG).read_text()))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, (A, B, scaling) in factors.items():
        if name in remainder:
            left, right = remainder[name]
            modules[name] = (
                torch.cat([A.float(), right.float()]),
                torch.cat([scaling * B.float(), left.float()], 1),
                1.0,
            )
        else:
            modules[name] = (A, B, scaling)
    write_peft_adapter(out, modules, spec, head)
    normalise_adapter_config(out, base_model=base_model)
    return out
