"""Writers for what ``pull`` hands back: a PEFT adapter, and the residual as (part of) a PEFT adapter.

Residuals are :class:`chorus_mq.factors.Residual` values (``None`` means exactly zero); a
dense one is factorised exactly by :func:`chorus_mq.factors.factor_dense`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import InvalidAdapter
from ..factors import Residual, factor_dense
from .delta import DeltaFile, check_against_spec, check_module_name, check_pair, classify_key
from .header import DEFAULT_MAX_HEADER_BYTES, strict_json
from .residual import checked_residual
from .spec import LoraSpec, fit_spec
from .writer import write_safetensors


def _residual_factors(module: str, value: Residual | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(left, right)`` of a residual, None when it is zero (a dense zero factors to rank 0)."""
    res = checked_residual(module, value)
    if res is None:
        return None
    if res.dense is not None:
        left, right = factor_dense(res.dense)
    else:
        assert res.left is not None and res.right is not None  # a factored Residual has both
        left, right = res.left, res.right
    return (left, right) if left.shape[1] else None


def write_peft_adapter(
    out_dir: str | os.PathLike[str],
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    spec: LoraSpec,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    Returns the sha256 hex of ``adapter_model.safetensors``.

    ``modules`` maps module name -> (A, B, scaling). Per-module ranks and scalings are
    expressed as ``rank_pattern``/``alpha_pattern`` (alpha = scaling * r, rsLoRA off);
    fan_in_fan_out, task_type, base model and modules_to_save come from ``spec``.
    """
    if not modules:
        raise InvalidAdapter("no modules to write: a PEFT adapter needs at least one LoRA module")
    tensors: dict[str, torch.Tensor] = {}
    ranks, scalings = {}, {}
    for name, (A, B, scaling) in sorted(modules.items()):
        check_module_name(name)
        ranks[name] = check_pair(name, tuple(A.shape), tuple(B.shape)).r
        scalings[name] = float(scaling)
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
    out_spec = fit_spec(spec, ranks, scalings)
    for name, r_module in ranks.items():  # a module peft would not target is silently dropped on load
        check_against_spec(name, r_module, out_spec)
    for key, tensor in (extras or {}).items():
        if classify_key(key, out_spec) is not None:
            raise InvalidAdapter(f"extra {key!r} is a LoRA key; pass LoRA factors in modules")
        tensors[key] = tensor
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors without format=pt; peft itself does not care
    digest = write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(out_spec.to_peft_config(), indent=2, sort_keys=True) + "\n")
    return digest


def write_residual_adapter(
    out_dir: str | os.PathLike[str], residuals: Mapping[str, Residual | None], spec: LoraSpec
) -> int:
    """Write the residual as a second PEFT LoRA adapter (lora_B = left, lora_A = right, scaling 1).

    Loaded alongside the global adapter (both active), base + both adapters equals the
    exact update with the base weights untouched. Dense residuals are factorised by SVD.
    Returns the number of modules written; writes nothing and returns 0 if every residual is zero.
    """
    modules = {}
    for name, value in sorted(residuals.items()):
        parts = _residual_factors(name, value)
        if parts is not None:
            left, right = parts
            modules[name] = (right, left, 1.0)
    if modules:
        # no task type: peft would otherwise expect this adapter to carry the task head too
        write_peft_adapter(out_dir, modules, spec.replace(modules_to_save=(), task_type=None))
    return len(modules)


def write_exact_adapter(
    out_dir: str | os.PathLike[str], global_dir: str | os.PathLike[str], residuals: Mapping[str, Residual | None]
) -> None:
    """Write one PEFT adapter equal to the global adapter plus ``residuals``.

    Per module ``B' = [s*B | left]``, ``A' = [A ; right]`` with scaling 1, task heads
    kept: loaded alone on the untouched base it gives the exact model, for any task type.
    """
    global_dir = Path(global_dir)
    config = strict_json((global_dir / "adapter_config.json").read_bytes(), "adapter_config.json")
    spec = LoraSpec.from_peft_config(config)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    weights = global_dir / "adapter_model.safetensors"
    with DeltaFile.open(weights, max_header_bytes=DEFAULT_MAX_HEADER_BYTES, spec=spec) as adapter:
        for name in adapter.modules:
            A, B = adapter.factors(name)
            A, B = A.float(), B.float() * spec.scaling(name, A.shape[0])
            parts = _residual_factors(name, residuals.get(name))
            if parts is not None:
                left, right = parts
                A, B = torch.cat([A, right.float()]), torch.cat([B, left.float()], dim=1)
            modules[name] = (A.contiguous(), B.contiguous(), 1.0)
        extras = {key: adapter.extra(key) for key in adapter.extras}
    write_peft_adapter(out_dir, modules, spec, extras)
