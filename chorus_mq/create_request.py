"""A request to create a federation: ``chorus-mq federation create``'s options as one typed object.

The CLI builds a :class:`CreateRequest` once from its flags; Python builds the same object. :func:`resolve`
turns it into what :func:`chorus_mq.federation.create` takes (the :class:`FederationConfig`, the declared
model and the round-0 adapter, which it builds from the base model for ``task``), and
:func:`create_federation` creates the federation from it. The defaults that depend on other options (the
quorum of a buffered federation, relative clipping off where it cannot run) are decided here, once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from .errors import ConfigError
from .names import (
    PEFT_TASK_TYPES,
    ExpirePolicy,
    FederationMode,
    MissingModules,
    RobustAggregate,
    ServerOptimizer,
    SnapshotDtype,
    Strategy,
    TaskType,
    WeightPolicy,
)
from .state import FederationConfig
from .strategy import strategy_spec

if TYPE_CHECKING:
    from .adapters import ModelDecl
    from .sdk.operator import OperatorSdk


class ConfigFields(TypedDict, total=False):
    """The :class:`FederationConfig` fields a request passes on as they are; an absent one takes the config's
    default. (Name, quorum, mode, the buffered settings, relative clipping and the task come from the request's
    own fields.)"""

    strategy: Strategy
    weights: WeightPolicy
    max_client_weight: float
    missing_modules: MissingModules
    max_update_norm: float
    prox_mu: float
    scaffold: bool
    personal_heads: bool
    server_opt: ServerOptimizer
    server_lr: float | None
    server_momentum: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    round_timeout: int  # sync; a buffered federation's is its flush timeout
    min_quorum: int  # sync; a buffered federation's is its min buffer
    expire_policy: ExpirePolicy
    clients_per_round: int
    checkpoint_every: int
    snapshot_dtype: SnapshotDtype
    out_rank: int
    clip_norm: float
    screen_outliers: bool
    outlier_z: float
    robust_aggregate: RobustAggregate
    trim: int
    dp_noise_multiplier: float  # set directly; a DpBudget derives it instead
    dp_delta: float
    secure_aggregation: bool
    secagg_neighbours: int
    secagg_threshold: int
    secagg_phase_timeout: int


class _ModeFields(TypedDict, total=False):
    """The FederationConfig fields the request's mode decides (beside ConfigFields' min_quorum, round_timeout)."""

    relative_clip: float
    max_staleness: int
    staleness_weight: str
    max_per_client_per_flush: int


@dataclass(frozen=True)
class ModelSource:
    """Where the federation's model comes from: a local model directory (module shapes read from its safetensors
    headers) or the model's name, a reference adapter that declares the shapes, or an initial adapter published
    as round 0. With ``task`` and neither adapter, round 0 is built from the local base model: LoRA at
    ``lora_rank``/``lora_alpha`` on ``target_modules`` plus the task head, seeded by ``seed``."""

    base_model: str
    reference_adapter: Path | None = None
    initial_adapter: Path | None = None
    task: TaskType | None = None
    labels: tuple[str, ...] = ()  # seq-cls: in label-id order
    target_modules: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0


@dataclass(frozen=True)
class BufferFlags:
    """``--mode buffered``'s settings (None: not given); a synchronous federation refuses each one given. A buffer
    is a round: ``buffer`` (K) is its quorum, ``min_buffer`` its min-quorum, ``flush_timeout`` its deadline."""

    buffer: int | None = None
    min_buffer: int | None = None
    flush_timeout: int | None = None
    max_staleness: int | None = None
    staleness_weight: str | None = None
    max_per_client_per_flush: int | None = None


@dataclass(frozen=True)
class DpBudget:
    """Server-side client-level DP as a budget: ``epsilon`` spent over ``rounds`` rounds at the config's
    ``dp_delta``; the noise multiplier is the smallest that fits it (``aggregation.dp.noise_for_budget``)."""

    epsilon: float
    rounds: int = 1


@dataclass(frozen=True)
class CreateRequest:
    """Everything ``federation create`` is told. ``quorum``: deltas that close a round (required in sync mode,
    refused in buffered mode, whose quorum is ``buffering.buffer``); ``relative_clip`` None: the config's default
    in sync mode, off (0) in buffered mode and with secure aggregation, where it cannot run."""

    name: str
    model: ModelSource
    quorum: int | None = None
    mode: FederationMode = FederationMode.SYNC
    buffering: BufferFlags = field(default_factory=BufferFlags)
    relative_clip: float | None = None
    dp_budget: DpBudget | None = None
    fields: ConfigFields = field(default_factory=ConfigFields)


@dataclass(frozen=True)
class Resolved:
    """A request resolved: the federation's config, its declared model, and the adapter round 0 publishes."""

    config: FederationConfig
    model: ModelDecl
    initial_adapter: Path | None


@dataclass(frozen=True)
class Created:
    """A created federation's config, and whether round 0 holds an initial adapter."""

    config: FederationConfig
    initial_adapter: bool


def create_federation(sdk: OperatorSdk, request: CreateRequest) -> Created:
    """Create the federation ``request`` describes, round 0 included (see
    :meth:`chorus_mq.sdk.operator.OperatorSdk.create_federation`)."""
    with resolve(request) as resolved:
        sdk.create_federation(resolved.config, model=resolved.model, initial_adapter=resolved.initial_adapter)
        return Created(resolved.config, resolved.initial_adapter is not None)


@contextmanager
def resolve(request: CreateRequest) -> Iterator[Resolved]:
    """``request`` resolved; ConfigError for an option that does not fit the others. An initial adapter built from
    the base model lives in a temporary directory until the block ends."""
    from .adapters import model_decl_from_adapter, model_decl_from_dir
    from .federation import canonical_decl

    fields = request.fields.copy()
    quorum, decided = _mode_fields(request, fields)
    if request.dp_budget is not None:
        from .aggregation.dp import noise_for_budget

        delta = fields.get("dp_delta", FederationConfig.dp_delta)
        fields["dp_noise_multiplier"] = noise_for_budget(request.dp_budget.epsilon, delta, request.dp_budget.rounds)
    source = request.model
    task_type = source.task
    model_dir = Path(source.base_model)
    if task_type is not None and not model_dir.is_dir():
        from .training.data import resolve_model

        model_dir = resolve_model(source.base_model)  # an embedded model's name (minilm)
    with ExitStack() as stack:
        initial_adapter = source.initial_adapter
        if task_type is not None and initial_adapter is None and source.reference_adapter is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chorus-init-")))
            strategy = fields.get("strategy", FederationConfig.strategy)
            initial_adapter = _build_initial(source, task_type, model_dir, workdir / "initial", strategy)
        declared_from = source.reference_adapter or initial_adapter
        if declared_from:
            decl = model_decl_from_adapter(declared_from)
        elif model_dir.is_dir():
            decl = canonical_decl(
                model_decl_from_dir(
                    model_dir,
                    task_type=None if task_type is None else str(task_type),
                    target_modules=source.target_modules,
                ),
                model_dir,
                task_type,
            )
        else:
            raise ConfigError(
                f"{source.base_model!r} is not a local model directory: declare the model's module shapes "
                "with --base-model DIR (config.json + safetensors headers are read, no weights) or "
                "--reference-adapter PATH (a PEFT adapter trained for this model)"
            )
        if task_type is None and decl.task_type:
            task_type = _task_from_peft(decl.task_type)
        config = FederationConfig(
            name=request.name,
            base_model=source.base_model,
            quorum=quorum,
            mode=request.mode,
            task_type=task_type,
            labels=source.labels,
            fan_in_fan_out=decl.fan_in_fan_out,
            **fields,
            **decided,
        )
        yield Resolved(config, decl, initial_adapter)


def _build_initial(source: ModelSource, task: TaskType, model_dir: Path, out: Path, strategy: Strategy) -> Path:
    """Round 0 built from the local base model for ``task``."""
    if not model_dir.is_dir():
        raise ConfigError(
            "--task builds the initial adapter from a local model: --base-model must be a "
            "model directory (config.json + safetensors)"
        )
    if task == TaskType.SEQ_CLS and not source.labels:
        raise ConfigError("--task seq-cls needs --labels (comma-separated, in label-id order)")
    from .training.model import build_initial_adapter

    return build_initial_adapter(
        model_dir,
        out,
        task=task,
        labels=source.labels,
        target_modules=source.target_modules,
        rank=source.lora_rank,
        alpha=source.lora_alpha,
        seed=source.seed,
        fed_sb=strategy_spec(strategy).sandwich,
    )


def _mode_fields(request: CreateRequest, fields: ConfigFields) -> tuple[int, _ModeFields]:
    """The quorum, and the fields the request's mode decides: a buffered federation's flags mapped onto the round
    machine's fields (a buffer is a round; its min buffer and flush timeout set on ``fields``), relative
    clipping's default; ConfigError for a flag of the other mode."""
    decided = _ModeFields()
    buffering = request.buffering
    if request.relative_clip is not None:
        decided["relative_clip"] = request.relative_clip
    elif request.mode == FederationMode.BUFFERED or fields.get("secure_aggregation"):
        # off where it cannot run (secure aggregation: no client's norm is seen) and, by default, in buffered mode,
        # whose flushes are exact per flush unless the operator asks for a bound (--relative-clip K applies there)
        decided["relative_clip"] = 0.0
    buffered_only = {
        "--buffer": buffering.buffer,
        "--min-buffer": buffering.min_buffer,
        "--flush-timeout": buffering.flush_timeout,
        "--max-staleness": buffering.max_staleness,
        "--staleness-weight": buffering.staleness_weight,
        "--max-per-client-per-flush": buffering.max_per_client_per_flush,
    }
    if request.mode != FederationMode.BUFFERED:
        given = [flag for flag, value in buffered_only.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} applies only to --mode buffered")
        if request.quorum is None:
            raise ConfigError("--quorum is required (deltas that close a round)")
        return request.quorum, decided
    buffer, min_buffer, flush_timeout = buffering.buffer, buffering.min_buffer, buffering.flush_timeout
    if buffer is None:
        raise ConfigError("--mode buffered needs --buffer K (accepted deltas per flush)")
    if request.quorum is not None or fields.get("min_quorum") or fields.get("round_timeout"):
        raise ConfigError(
            "--mode buffered takes --buffer, --min-buffer and --flush-timeout instead of --quorum, --min-quorum "
            "and --round-timeout"
        )
    if min_buffer is not None and not 1 <= min_buffer <= buffer:
        raise ConfigError(f"--min-buffer must be between 1 and --buffer {buffer}")
    if flush_timeout is not None and flush_timeout < 0:
        raise ConfigError("--flush-timeout cannot be negative (0: flush only at K deltas)")
    fields["min_quorum"] = 1 if min_buffer is None else min_buffer
    fields["round_timeout"] = flush_timeout or 0
    if buffering.max_staleness is not None:
        decided["max_staleness"] = buffering.max_staleness
    if buffering.staleness_weight is not None:
        decided["staleness_weight"] = buffering.staleness_weight
    if buffering.max_per_client_per_flush is not None:
        decided["max_per_client_per_flush"] = buffering.max_per_client_per_flush
    return buffer, decided


def _task_from_peft(peft_task: str) -> TaskType | None:
    for ours, theirs in PEFT_TASK_TYPES.items():
        if theirs == peft_task:
            return ours
    return None
