"""What a ``train`` run keeps and reports per round: the trained adapter in its round's dir, the round's record.

``driver.py`` (synchronous rounds) and ``buffered_loop.py`` (buffered contributions) both write and read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .dp import DPReport

_TRAINED_FILE = "trained.json"
#: a --personal-heads round's trained head, beside its (headless) adapter until the round completes
ROUND_HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class RoundRecord:
    """What ``train`` reports per round it took part in (``--json`` prints one per line)."""

    round: int
    state: str  # how the round ended: complete | failed | expired | aborted
    upload: str  # accepted | duplicate | fired
    start_round: int | None  # the global round this client's training started from
    local_loss: float
    eval_accuracy: float | None
    eval_loss: float | None
    upload_bytes: int
    seconds: float
    steps: int
    examples: int
    epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Trained:
    """A round's trained adapter in the work dir, and what its upload needs to say."""

    round: int
    start_round: int | None
    adapter: Path
    loss: float
    steps: int
    examples: int
    dp: DPReport | None
    #: SCAFFOLD: the learning rate summed over the round's steps (the upload declares it); None: not SCAFFOLD
    lr_sum: float | None = None

    @classmethod
    def load(cls, round_dir: Path) -> Trained | None:
        path = round_dir / _TRAINED_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        dp = DPReport(**raw["dp"]) if raw.get("dp") else None
        return cls(
            raw["round"],
            raw["start_round"],
            round_dir / "adapter",
            raw["loss"],
            raw["steps"],
            raw["examples"],
            dp,
            raw.get("lr_sum"),
        )

    def save(self, round_dir: Path) -> None:
        raw = {
            "round": self.round,
            "start_round": self.start_round,
            "loss": self.loss,
            "steps": self.steps,
            "examples": self.examples,
            "dp": self.dp.to_dict() if self.dp else None,
            "lr_sum": self.lr_sum,
        }
        write_json(round_dir / _TRAINED_FILE, raw)


def write_json(path: Path, raw: dict[str, Any]) -> None:
    """Write ``raw`` to ``path`` in one step: a crash leaves the old file or the new one, never half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
