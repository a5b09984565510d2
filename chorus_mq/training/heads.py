"""Personalised task heads (``federation create --personal-heads``): each client keeps its own head.

The LoRA body is aggregated as usual; the seq-cls head (peft's ``modules_to_save``) is trained with
it but never leaves the client. ``train`` keeps the head in its work dir (``personal_head.safetensors``,
the adapter's own key names) and starts every round from the global body plus that head (round 0's
head the first time); ``export --head own`` merges it in instead of the published one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, IncompatibleDelta, InvalidAdapter
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PERSONAL_HEAD_FILE, PERSONAL_HEAD_FORMAT

if TYPE_CHECKING:
    import torch

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class PersonalHead:
    """A client's own task head, and the round whose training produced it (a complete round)."""

    tensors: Mapping[str, torch.Tensor]
    federation: str
    client_id: str
    round: int

    def save(self, path: Path) -> Path:
        """Write it atomically (a temporary file, then a rename)."""
        from safetensors.torch import save_file

        metadata = {
            "format": PERSONAL_HEAD_FORMAT,
            "federation": self.federation,
            "client_id": self.client_id,
            "round": str(self.round),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().float().contiguous() for k, v in self.tensors.items()}, str(tmp), metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> PersonalHead:
        """Read a head file, checking its format and that every value is finite."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a mapping)
        except (OSError, ValueError, SafetensorError) as exc:
            raise InvalidAdapter(f"{path} is not a task head file: {exc}") from None
        if metadata.get("format") != PERSONAL_HEAD_FORMAT or not tensors:
            raise InvalidAdapter(f"{path} is not a chorus-mq task head ({PERSONAL_HEAD_FORMAT})")
        for key, tensor in tensors.items():
            if not bool(tensor.isfinite().all()):
                raise InvalidAdapter(f"{path}: head tensor {key!r} is not finite")
        return cls(tensors, metadata.get("federation", ""), metadata.get("client_id", ""), int(metadata["round"]))


def head_path(workdir: str | Path) -> Path:
    return Path(workdir) / PERSONAL_HEAD_FILE


def own_head(workdir: str | Path, federation: str | None = None) -> PersonalHead:
    """The head ``train`` kept in ``workdir`` (``export --head own``); ConfigError when it has none."""
    path = head_path(workdir)
    if not path.exists():
        raise ConfigError(
            f"{workdir} holds no task head of its own ({PERSONAL_HEAD_FILE}): it is written when a round this "
            "client trained in completes, in a --personal-heads federation (give --workdir the client's train "
            "work dir)"
        )
    head = PersonalHead.load(path)
    if federation is not None and head.federation != federation:
        raise ConfigError(f"the head in {workdir} belongs to federation {head.federation!r}, not {federation!r}")
    return head


def head_state(model: Any) -> dict[str, torch.Tensor]:
    """The task head of a PEFT model, by the key names its saved adapter uses."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone().float() for k, v in state.items() if not k.endswith(_LORA_SUFFIXES)}


def apply_head(model: Any, head: Mapping[str, torch.Tensor]) -> None:
    """Write ``head`` (adapter key names) into the model's task head; refuse keys that fit nothing."""
    from peft.utils import set_peft_model_state_dict

    expected = set(head_state(model))
    unknown = sorted(set(head) - expected)
    missing = sorted(expected - set(head))
    if unknown or missing:
        raise IncompatibleDelta(
            f"the task head does not fit this model (unknown: {unknown[:3]}, missing: {missing[:3]}): "
            "a head from another federation or base model?"
        )
    set_peft_model_state_dict(model, {k: v.float() for k, v in head.items()})


def split_head(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Take the task head out of a saved adapter: the directory keeps the LoRA modules only (what a
    ``--personal-heads`` client uploads, with no ``modules_to_save``); returns the head's tensors."""
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    head = {k: v for k, v in tensors.items() if not k.endswith(_LORA_SUFFIXES)}
    if not head:
        raise ConfigError(f"{adapter_dir} carries no task head to keep local")
    body = {k: v.contiguous() for k, v in tensors.items() if k.endswith(_LORA_SUFFIXES)}
    save_file(body, str(weights), {"format": "pt"})
    config_path = adapter_dir / ADAPTER_CONFIG
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["modules_to_save"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return head
