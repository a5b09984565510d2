"""``chorus-mq export``: a standalone transformers model of a round, with no PEFT or chorus-mq needed to use it.

Base + cumulative residual (folded in float32) + the global adapter merged by PEFT in
float32, task head included, then cast to the requested dtype and saved with
``save_pretrained`` next to the tokenizer, so ``AutoModelFor....from_pretrained(OUT)`` loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError
from chorus_mq.names import ExportDtype, TaskType

from .model import exact_model, load_tokenizer

if TYPE_CHECKING:
    import torch


def export_model(
    pulled_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    task: TaskType | str,
    dtype: ExportDtype | str = ExportDtype.FLOAT32,
    labels: Sequence[str] | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Merge round ``pulled_dir``'s exact model into plain weights and save it (and the tokenizer) in ``out_dir``.

    ``head`` (a ``--personal-heads`` client's own, by adapter key names) replaces the published task head.
    """
    import torch

    try:
        target = ExportDtype(dtype)
    except ValueError:
        raise ConfigError(f"--dtype {dtype!r}: choose {', '.join(ExportDtype.values())}") from None
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} is not empty: export writes a fresh model directory")
    model = exact_model(pulled_dir, model_dir, task=TaskType(task), labels=labels)
    if head is not None:
        from .heads import apply_head

        apply_head(model, head)
    merged: Any = model.merge_and_unload()  # float32: the base was loaded, and corrected, in float32
    if target == ExportDtype.BFLOAT16:
        merged = merged.to(torch.bfloat16)
    merged.save_pretrained(str(out))
    load_tokenizer(model_dir).save_pretrained(str(out))
    return out
