"""Training a Fed-SB round on a standard PEFT model: ``lora_B.weight`` parametrised as ``B_frozen @ R``.

The pulled directory holds the round's published tensors as they are (``fed_sb.safetensors``: the frozen
frame B, A and the global R) and their PEFT form (``lora_B = B R``), which :func:`.model.start_model` loads
like any adapter. :func:`attach_r` then re-expresses each module's ``lora_B.weight`` through
``torch.nn.utils.parametrize`` as ``B @ R`` with R (initialised bit for bit to the published R) the only
trainable LoRA parameter; A stays frozen. :func:`write_r_upload` writes what a Fed-SB client uploads:
``<module>.lora_R.weight`` per module and the task head, with the adapter's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from chorus_mq.errors import ConfigError
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FED_SB_FILE

_LORA_B = ".lora_B.default"


class _InFrame(nn.Module):
    """``weight = B @ R``: the frozen frame B times the trained R (the parametrised tensor is R)."""

    def __init__(self, b: Tensor, r: Tensor):
        super().__init__()
        self.register_buffer("frame", b.to(torch.float32).contiguous(), persistent=False)
        self._start = r.to(torch.float32).contiguous()

    frame: Tensor

    def forward(self, r: Tensor) -> Tensor:
        return self.frame @ r

    def right_inverse(self, _weight: Tensor) -> Tensor:
        # the published R itself (not a solve from B R): an untouched R is uploaded bit for bit
        return self._start.clone()


@dataclass(frozen=True)
class Attached:
    """The modules whose ``lora_B`` is parametrised, each with the layer holding R."""

    layers: dict[str, nn.Module]

    def finish(self) -> dict[str, Tensor]:
        """Each module's trained R (float32, detached); the parametrisations are removed, ``lora_B.weight``
        left at ``B @ R``, so the model saves as a standard PEFT adapter."""
        from torch.nn.utils import parametrize

        out = {}
        for module, layer in self.layers.items():
            original: Tensor = layer.parametrizations.weight.original  # type: ignore[union-attr,assignment]
            out[module] = original.detach().clone()
            with torch.no_grad():
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        return out


def attach_r(model: nn.Module, pulled: Path) -> Attached:
    """Parametrise every LoRA module of ``model`` (loaded from ``pulled``) as ``B @ R`` with the published
    frame and R; freeze every ``lora_A``. ConfigError when ``pulled`` has no Fed-SB tensors or a module lacks
    them."""
    from safetensors.torch import load_file
    from torch.nn.utils import parametrize

    path = pulled / FED_SB_FILE
    if not path.is_file():
        raise ConfigError(f"{pulled} holds no {FED_SB_FILE}: pull a round of the fed-sb federation first")
    published = load_file(str(path))
    layers: dict[str, nn.Module] = {}
    for name, sub in model.named_modules():
        if not name.endswith(_LORA_B):
            continue
        module = name.removesuffix(_LORA_B)
        key = module if module.startswith("base_model.model.") else f"base_model.model.{module}"
        b, r = published.get(f"{key}.lora_B.weight"), published.get(f"{key}.lora_R.weight")
        if b is None or r is None:
            raise ConfigError(f"module {key!r} has no published fed-sb frame and R in {path}")
        weight: Any = sub.weight
        parametrize.register_parametrization(sub, "weight", _InFrame(b.to(weight.device), r.to(weight.device)))
        layers[key] = sub
    if not layers:
        raise ConfigError("the model has no LoRA modules to train R in")
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)  # the frame's A: uploaded nowhere, used as published
    return Attached(layers)


def write_r_upload(adapter_dir: Path, trained: dict[str, Tensor]) -> Path:
    """Rewrite a saved adapter (``save_adapter``'s output) as a Fed-SB upload: each module's lora_A / lora_B
    replaced by its ``lora_R.weight``; the head and ``adapter_config.json`` kept. Returns ``adapter_dir``."""
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    out = {k: v for k, v in tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    for module, r in trained.items():
        if f"{module}.lora_B.weight" not in tensors:
            raise ConfigError(f"the saved adapter has no module {module!r}")
        out[f"{module}.lora_R.weight"] = r.cpu().contiguous()
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{adapter_dir} has no {ADAPTER_CONFIG}")
    tmp = weights.with_name(f".{weights.name}.part")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    return adapter_dir
