"""Writers for what ``pull`` hands back: a PEFT adapter, the residual, the residual as an adapter.

Residuals are weight-space matrices in peft's ``B @ A`` layout (d_out x d_in), given as a
dense tensor, a ``(left, right)`` pair whose product is the residual, or any object with
``dense``/``left``/``right`` attributes (the aggregation layer's ``Residual``); ``None``
means exactly zero. This layer never imports the aggregation layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..errors import IncompatibleDelta, InvalidAdapter
from .delta import (DeltaFile, check_against_spec, check_matrix, check_module_name, check_pair, classify_key,
                    open_safetensors, read_finite)
from .header import DEFAULT_MAX_HEADER_BYTES, read_header, strict_json, write_safetensors
from .spec import LoraSpec, default_targets, module_path, pattern_fit

RESIDUAL_FORMAT = "chorus-residual/1"
_SUFFIXES = (".residual_left", ".residual_right", ".residual")  # longest first: suffix stripping
ResidualLike = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], Any, None]
Parts = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _parts(module: str, value: ResidualLike) -> Parts | None:
    """Normalise a residual value to a dense fp32 tensor or an fp32 (left, right) pair, shape-checked."""
    if value is not None and not isinstance(value, (torch.Tensor, tuple)):
        value = value.dense if value.dense is not None else (value.left, value.right)
    if value is None:
        return None
    check_module_name(module)
    if isinstance(value, torch.Tensor):
        check_matrix(module, "residual", tuple(value.shape), "(d_out, d_in)")
        return value.float().contiguous()
    left, right = value
    check_pair(module, tuple(right.shape), tuple(left.shape), ("residual_right", "residual_left"))
    return left.float().contiguous(), right.float().contiguous()


def write_peft_adapter(out_dir: str | os.PathLike[str],
                       modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                       spec: LoraSpec, extras: Mapping[str, torch.Tensor] | None = None) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    Returns the sha256 hex of ``adapter_model.safetensors``.

    ``modules`` maps module name -> (A, B, scaling). Per-module ranks and scalings are
    expressed as ``rank_pattern``/``alpha_pattern`` (alpha = scaling * r, rsLoRA off);
    fan_in_fan_out, task_type, base model and modules_to_save come from ``spec``.
    """
    if not modules:
        raise InvalidAdapter("no modules to write: a PEFT adapter needs at least one LoRA module")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, (A, B, scaling) in sorted(modules.items()):
        check_module_name(name)
        ranks[name] = check_pair(name, tuple(A.shape), tuple(B.shape)).r
        alphas[name] = float(scaling) * ranks[name]
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
    r, rank_pattern = pattern_fit(ranks)
    alpha, alpha_pattern = pattern_fit(alphas)
    targets = spec.target_modules or default_targets(modules)
    out_spec = spec.replace(r=r, lora_alpha=alpha, use_rslora=False, target_modules=targets,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
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


def write_residual(path: str | os.PathLike[str], residuals: Mapping[str, ResidualLike]) -> str:
    """Write ``residual.safetensors`` (fp32, ``M.residual`` or ``M.residual_left/right``); return sha256 hex."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in sorted(residuals.items()):
        parts = _parts(name, value)
        if isinstance(parts, torch.Tensor):
            tensors[f"{name}.residual"] = parts
        elif parts is not None:
            tensors[f"{name}.residual_left"], tensors[f"{name}.residual_right"] = parts
    return write_safetensors(path, tensors, {"format": RESIDUAL_FORMAT})


def read_residual(path: str | os.PathLike[str], *,
                  max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Parts]:
    """Read and validate a residual file: module -> dense tensor or (left, right), fp32, finite."""
    path = Path(path)
    header = read_header(path, max_header_bytes=max_header_bytes)
    if header.metadata.get("format") != RESIDUAL_FORMAT:
        raise InvalidAdapter(f"{path.name} is not a residual file (metadata format must be {RESIDUAL_FORMAT!r})")
    grouped: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise InvalidAdapter(
                f"unexpected key {key!r} in residual file (expected M.residual or M.residual_left/right)"
            )
        grouped.setdefault(key[: -len(suffix)], {})[suffix] = key
    out: dict[str, Parts] = {}
    handle = open_safetensors(path)
    try:
        for module, keys in sorted(grouped.items()):
            if set(keys) not in ({".residual"}, {".residual_left", ".residual_right"}):
                raise InvalidAdapter(f"module {module!r}: residual needs either .residual or both "
                                     f"_left and _right, got {sorted(keys)}")
            loaded = {s: read_finite(handle, k, f"residual {k!r}") for s, k in keys.items()}
            value = loaded.get(".residual")
            out[module] = _parts(module, value if value is not None else
                                 (loaded[".residual_left"], loaded[".residual_right"]))
    finally:
        handle.__exit__(None, None, None)
    return out


def _factor(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact low-rank factors of a dense residual: SVD in fp64, dropping only directions
    below fp32 resolution (they are not representable in the fp32 residual anyway)."""
    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    tol = (S[0] if S.numel() else 0.0) * max(dense.shape) * torch.finfo(torch.float32).eps
    k = int((S > tol).sum())
    root = S[:k].sqrt()
    return (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()


def write_residual_adapter(out_dir: str | os.PathLike[str], residuals: Mapping[str, ResidualLike],
                           spec: LoraSpec) -> int:
    """Write the residual as a second PEFT LoRA adapter (lora_B = left, lora_A = right, scaling 1).

    Loaded alongside the global adapter (both active), base + both adapters equals the
    exact update with the base weights untouched. Dense residuals are factorised by SVD.
    Returns the number of modules written; writes nothing and returns 0 if every residual is zero.
    """
    modules = {}
    for name, value in sorted(residuals.items()):
        parts = _parts(name, value)
        if parts is None:
            continue
        left, right = _factor(parts) if isinstance(parts, torch.Tensor) else parts
        if left.shape[1]:  # an all-zero dense residual factors to rank 0
            modules[name] = (right, left, 1.0)
    if modules:
        # no task type: peft would otherwise expect this adapter to carry the task head too
        write_peft_adapter(out_dir, modules, spec.replace(modules_to_save=(), task_type=None))
    return len(modules)


def write_exact_adapter(out_dir: str | os.PathLike[str], global_dir: str | os.PathLike[str],
                        residuals: Mapping[str, ResidualLike]) -> None:
    """Write one PEFT adapter equal to the global adapter plus ``residuals``.

    Per module ``B' = [s*B | left]``, ``A' = [A ; right]`` with scaling 1, task heads
    kept: loaded alone on the untouched base it gives the exact model, for any task type.
    """
    global_dir = Path(global_dir)
    spec = LoraSpec.from_peft_config(strict_json((global_dir / "adapter_config.json").read_bytes(),
                                                 "adapter_config.json"))
    modules, extras = {}, {}
    with DeltaFile.open(global_dir / "adapter_model.safetensors", max_header_bytes=DEFAULT_MAX_HEADER_BYTES,
                        spec=spec) as adapter:
        for name in adapter.modules:
            A, B = adapter.factors(name)
            B = B.float() * spec.scaling(name, A.shape[0])
            parts = _parts(name, residuals[name]) if name in residuals else None
            if parts is not None:
                left, right = _factor(parts) if isinstance(parts, torch.Tensor) else parts
                A, B = torch.cat([A.float(), right.float()]), torch.cat([B, left.float()], dim=1)
            modules[name] = (A.float().contiguous(), B.contiguous(), 1.0)
        extras = {key: adapter.extra(key) for key in adapter.extras}
    write_peft_adapter(out_dir, modules, spec, extras)


def fold_residuals(state_dict: Mapping[str, torch.Tensor], residuals: Mapping[str, ResidualLike], *,
                   fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """Base state dict + residuals, as a new fp32 state dict (``<module path>.weight`` += residual).

    ``fan_in_fan_out`` (GPT-2 ``Conv1D``) adds the transpose, since such weights are stored
    d_in x d_out. Floating tensors come back fp32 (untouched fp32 tensors are shared, not
    copied). Warning: do not cast the result to bf16/fp16 - a folded residual loses about
    11% (bf16) / 1.4% (fp16) of itself to rounding; keep it fp32 or use the residual adapter.
    """
    out = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for name, value in sorted(residuals.items()):
        parts = _parts(name, value)
        if parts is None:
            continue
        key = f"{module_path(name)}.weight"
        if key not in out:
            raise IncompatibleDelta(f"residual for module {name!r} has no base weight {key!r} in the state dict "
                                    "(different base model?); refusing to drop it")
        dense = parts.double() if isinstance(parts, torch.Tensor) else parts[0].double() @ parts[1].double()
        dense = dense.T if fan_in_fan_out else dense
        if tuple(out[key].shape) != tuple(dense.shape):
            raise IncompatibleDelta(f"residual for {key!r} has shape {list(dense.shape)} but the weight is "
                                    f"{list(out[key].shape)} (fan_in_fan_out={fan_in_fan_out} right?)")
        out[key] = (out[key].double() + dense).float()
    return out
