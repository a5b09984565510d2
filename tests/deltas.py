"""Small synthetic deltas for tests: delta files with an embedded adapter_config."""

from __future__ import annotations

import json

import torch

from chorus_mq.adapters import LoraSpec, write_safetensors


def write_adapter(path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float = 8.0, extras=None):
    """A delta file with an embedded adapter_config; ``factors`` maps module path -> (A, B)."""
    rank = next(iter(factors.values()))[0].shape[0]
    spec = LoraSpec(
        r=rank,
        lora_alpha=alpha,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in factors})),
        modules_to_save=tuple(sorted({k.split(".")[2] for k in (extras or {})})),
    )
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
    tensors.update(extras or {})
    write_safetensors(path, tensors, {"format": "chorus-delta/1", "adapter_config": json.dumps(spec.to_peft_config())})
    return path


def write_r_adapter(path, rs: dict[str, torch.Tensor], *, alpha: float = 8.0):
    """A Fed-SB delta file (``<module>.lora_R.weight`` only) with an embedded adapter_config; ``rs`` maps
    module path -> R (rank x rank)."""
    rank = int(next(iter(rs.values())).shape[0])
    spec = LoraSpec(r=rank, lora_alpha=alpha, target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in rs})))
    tensors = {f"base_model.model.{module}.lora_R.weight": r for module, r in rs.items()}
    write_safetensors(path, tensors, {"format": "chorus-delta/1", "adapter_config": json.dumps(spec.to_peft_config())})
    return path


def random_factors(seed: int, modules=("layers.0.q", "layers.0.v"), r=4, d_out=16, d_in=12, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * scale) for m in modules}


def declared(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], extras=None):
    """The ModelDecl a federation declares for deltas shaped like ``factors`` (module path -> (A, B))."""
    from chorus_mq.adapters import ModelDecl

    modules = {f"base_model.model.{m}": (int(B.shape[0]), int(A.shape[1])) for m, (A, B) in factors.items()}
    return ModelDecl(modules=modules, extras={k: tuple(v.shape) for k, v in (extras or {}).items()})


def make_federation(sdk, name: str, *, quorum: int, factors=None, extras=None, base_model: str = "m", **options):
    """Create federation ``name`` declaring the model of ``factors`` (default: ``random_factors(0)``'s shapes)."""
    from chorus_mq.state import FederationConfig

    config = FederationConfig(name=name, base_model=base_model, quorum=quorum, **options)
    return sdk.create_federation(config, model=declared(factors or random_factors(0), extras))
