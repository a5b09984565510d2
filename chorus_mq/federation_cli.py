"""What ``chorus-mq federation create`` does with its options: declare the model, build the config."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .names import TaskType
from .state import FederationConfig

if TYPE_CHECKING:
    from .client import ChorusClient


def build_federation(
    sdk: ChorusClient,
    *,
    name: str,
    base_model: str,
    quorum: int,
    reference_adapter: str | None,
    initial_adapter: str | None,
    task: str | None,
    labels: str | None,
    target_modules: str | None,
    lora_rank: int,
    lora_alpha: float,
    seed: int,
    dp_epsilon: float | None,
    dp_rounds: int,
    **options: Any,
) -> tuple[FederationConfig, bool]:
    """Create the federation from ``federation create``'s options (``options``: the FederationConfig
    fields the CLI passes through as they are); returns its config and whether round 0 holds an
    initial adapter."""
    from .adapters import model_decl_from_adapter, model_decl_from_dir
    from .federation import canonical_decl

    if dp_epsilon is not None:
        from .aggregation.dp import noise_for_budget

        options["dp_noise_multiplier"] = noise_for_budget(dp_epsilon, options["dp_delta"], dp_rounds)
    targets = tuple(t.strip() for t in target_modules.split(",") if t.strip()) if target_modules else ()
    label_list = tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else ()
    task_type = TaskType(task) if task else None
    model_dir = Path(base_model)
    if task_type is not None and not model_dir.is_dir():
        from .training.data import resolve_model

        model_dir = resolve_model(base_model)  # an embedded model's name (minilm)
    workdir = None
    if task_type is not None and initial_adapter is None and reference_adapter is None:
        if not model_dir.is_dir():
            raise ConfigError(
                "--task builds the initial adapter from a local model: --base-model must be a "
                "model directory (config.json + safetensors)"
            )
        if task_type == TaskType.SEQ_CLS and not label_list:
            raise ConfigError("--task seq-cls needs --labels (comma-separated, in label-id order)")
        from .training.model import build_initial_adapter

        workdir = tempfile.TemporaryDirectory(prefix="chorus-init-")
        initial_adapter = str(
            build_initial_adapter(
                model_dir,
                Path(workdir.name) / "initial",
                task=task_type,
                labels=label_list,
                target_modules=targets,
                rank=lora_rank,
                alpha=lora_alpha,
                seed=seed,
            )
        )
    try:
        declared_from = reference_adapter or initial_adapter
        if declared_from:
            decl = model_decl_from_adapter(Path(declared_from))
        elif model_dir.is_dir():
            decl = canonical_decl(
                model_decl_from_dir(
                    model_dir, task_type=None if task_type is None else str(task_type), target_modules=targets
                ),
                model_dir,
                task_type,
            )
        else:
            raise ConfigError(
                f"{base_model!r} is not a local model directory: declare the model's module shapes "
                "with --base-model DIR (config.json + safetensors headers are read, no weights) or "
                "--reference-adapter PATH (a PEFT adapter trained for this model)"
            )
        if task_type is None and decl.task_type:
            task_type = _task_from_peft(decl.task_type)
        options["screen_outliers"] = bool(options.get("screen_outliers"))
        options["personal_heads"] = bool(options.get("personal_heads"))
        config = FederationConfig(
            name=name,
            base_model=base_model,
            quorum=quorum,
            task_type=task_type,
            labels=label_list,
            fan_in_fan_out=decl.fan_in_fan_out,
            **options,
        )
        sdk.create_federation(config, model=decl, initial_adapter=initial_adapter)
        return config, initial_adapter is not None
    finally:
        if workdir is not None:
            workdir.cleanup()


def _task_from_peft(peft_task: str) -> TaskType | None:
    from .names import PEFT_TASK_TYPES

    for ours, theirs in PEFT_TASK_TYPES.items():
        if theirs == peft_task:
            return ours
    return None
