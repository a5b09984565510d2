"""Build a pulled directory by hand (global adapter + cumulative residual), as ``sdk.pull`` writes it,
and the float64 oracle of the model it describes: base + Σ residuals + s·B·A, head from the adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chorus_mq.adapters import LoraSpec, write_residual
from chorus_mq.factors import Residual
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CUMULATIVE_FILE
from chorus_mq.training.model import PEFT_PREFIX, build_initial_adapter


def make_pulled(
    model_dir: Path, out: Path, *, task, labels=(), targets, rank: int = 4, seed: int = 0, residual_scale: float = 0.05
) -> Path:
    """An initial adapter with random non-zero B and head, plus a cumulative residual (dense and factored)."""
    build_initial_adapter(model_dir, out, task=task, labels=labels, target_modules=targets, rank=rank, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    tensors = load_file(out / ADAPTER_WEIGHTS)
    residuals = {}
    for i, key in enumerate(sorted(tensors)):
        t = tensors[key]
        if key.endswith("lora_B.weight"):
            tensors[key] = torch.randn(t.shape, generator=gen) * 0.1
            module = key.removesuffix(".lora_B.weight")
            d_out, d_in = t.shape[0], tensors[f"{module}.lora_A.weight"].shape[1]
            if i % 2:  # one module dense, the next factored, as pull writes whichever is smaller
                residuals[module] = Residual(dense=torch.randn(d_out, d_in, generator=gen) * residual_scale)
            else:
                residuals[module] = Residual(
                    left=torch.randn(d_out, 3, generator=gen) * residual_scale,
                    right=torch.randn(3, d_in, generator=gen),
                )
        elif not key.endswith("lora_A.weight"):  # the task head
            tensors[key] = torch.randn(t.shape, generator=gen) * 0.5
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_residual(out / CUMULATIVE_FILE, residuals)
    return out


def oracle_model(base, pulled: Path, *, fan_in_fan_out: bool):
    """A float64 copy of ``base`` with Σ residual + s·B·A added to each target weight and the adapter's head."""
    spec = LoraSpec.from_peft_config(json.loads((pulled / ADAPTER_CONFIG).read_text()))
    tensors = load_file(pulled / ADAPTER_WEIGHTS)
    residual = load_file(pulled / CUMULATIVE_FILE)
    model = copy.deepcopy(base).double()
    params = dict(model.named_parameters())
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            B = tensors[f"{module}.lora_B.weight"].double()
            update = spec.scaling(module, A.shape[0]) * B @ A.double()
            if f"{module}.residual" in residual:
                update = update + residual[f"{module}.residual"].double()
            else:
                update = (
                    update
                    + residual[f"{module}.residual_left"].double() @ residual[f"{module}.residual_right"].double()
                )
            weight = params[f"{module.removeprefix(PEFT_PREFIX)}.weight"]
            weight.data += update.T if fan_in_fan_out else update
        elif not key.endswith(".lora_B.weight"):
            params[key.removeprefix(PEFT_PREFIX)].data.copy_(A.double())
    return model.eval()


def logits(model, tokenizer, texts, dtype=torch.float32):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.to(dtype)
