"""Constants and builders shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from chorus_mq.names import TaskType
from chorus_mq.training.model import build_initial_adapter

LABELS = ("neg", "pos", "mixed")


def seq_cls_initial(model_dir: Path, out: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """The tests' seq-cls round 0: LoRA rank 4 on query/value and a head for ``labels``, from seed 0."""
    return build_initial_adapter(
        model_dir, out, task=TaskType.SEQ_CLS, labels=labels, target_modules=("query", "value"), rank=4, seed=0
    )


TEXTS = [
    "a wonderful, moving film",
    "dull and far too long",
    "the cast is great but the plot drags",
    "i loved every minute",
    "a waste of two hours",
    "funny in places, flat in others",
    "brilliant direction and a sharp script",
    "painfully boring",
    "not bad, not great either",
    "an instant classic",
    "the worst movie this year",
    "some good ideas, poorly executed",
]
