"""A tiny random Llama built from a config, and LoRA client adapters for it (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..adapters._util import tiny_llama as adapters_tiny_llama

TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0):
    """The adapters tests' tiny Llama with grouped k/v (2 heads), so that k/v and q differ in shape."""
    return adapters_tiny_llama(seed, kv_heads=2)


def client_adapter(base, out_dir: Path, *, rank: int, alpha: float, seed: int, use_rslora: bool = False) -> dict:
    """Save a PEFT adapter with random non-zero A and B; return {module path: (A, B, scaling)}."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), use_rslora=use_rslora, lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A = torch.randn(module.lora_A["default"].weight.shape, generator=gen) * 0.3
            B = torch.randn(module.lora_B["default"].weight.shape, generator=gen) * 0.3
            module.lora_A["default"].weight.data.copy_(A)
            module.lora_B["default"].weight.data.copy_(B)
            path = name.removeprefix("base_model.model.")
            factors[path] = (A, B, module.scaling["default"])
    model.save_pretrained(out_dir)
    return factors


def exact_model(base, clients: list[dict], weights: list[float]):
    """Base with Σ wᵢ sᵢ Bᵢ Aᵢ added to each target weight, computed in float64."""
    model = copy.deepcopy(base)
    total = sum(weights)
    params = dict(model.named_parameters())
    for path in clients[0]:
        update = sum(
            (w / total) * s * B.double() @ A.double()
            for w, c in zip(weights, clients, strict=True)
            for A, B, s in [c[path]]
        )
        params[f"{path}.weight"].data += update.float()
    return model


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits
