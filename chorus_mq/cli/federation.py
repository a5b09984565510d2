"""``chorus-mq federation create|list``: declare a federation's model, build its config, open round 1."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError
from ..names import (
    ExpirePolicy,
    FederationMode,
    MissingModules,
    RobustAggregate,
    ServerOptimizer,
    Strategy,
    TaskType,
    WeightPolicy,
)
from ..state import FederationConfig
from ..strategy import strategy_spec
from .options import choice, client_of, one_line_errors

if TYPE_CHECKING:
    from ..client import ChorusClient


@click.group()
def federation() -> None:
    """Create and inspect federations (operators)."""


@federation.command("create")
@click.argument("name")
@click.option(
    "--base-model",
    required=True,
    help="A local model directory (config.json + safetensors: module shapes are read from the headers) "
    "or the model's name when --reference-adapter declares the shapes.",
)
@click.option("--quorum", type=int, default=None, help="Deltas that close a round (sync mode; required there).")
@click.option(
    "--mode",
    type=choice(FederationMode),
    default=FederationMode.SYNC.value,
    show_default=True,
    help="sync: rounds wait for their quorum; buffered (FedBuff): no round barrier, every --buffer accepted "
    "deltas flush into the next version, each delta taken relative to the version it trained from.",
)
@click.option("--buffer", type=int, default=None, help="buffered: accepted deltas that flush into a new version (K).")
@click.option("--min-buffer", type=int, default=None, help="buffered: deltas a timeout flush needs (default 1).")
@click.option("--flush-timeout", type=int, default=None, help="buffered: seconds after which a buffer flushes anyway.")
@click.option(
    "--max-staleness",
    type=int,
    default=None,
    help="buffered: refuse a delta trained from a version more than S versions old (default 10).",
)
@click.option(
    "--staleness-weight",
    default=None,
    help="buffered: discount g(τ) of a delta τ versions stale: constant, poly:A ((1+τ)^-A; default poly:0.5) "
    "or hinge:A,B (FedBuff's: 1 up to B, then 1/(A(τ-B)+1)).",
)
@click.option(
    "--max-per-client-per-flush",
    type=int,
    default=None,
    help="buffered: a client's accepted deltas per flush (default 1).",
)
@click.option(
    "--reference-adapter",
    type=click.Path(exists=True),
    default=None,
    help="A PEFT adapter whose modules, shapes and task head every delta must match.",
)
@click.option(
    "--initial-adapter",
    type=click.Path(exists=True),
    default=None,
    help="Publish this PEFT adapter as round 0: every client's round 1 starts from it.",
)
@click.option(
    "--task",
    type=choice(TaskType),
    default=None,
    help="With a local --base-model: build the initial adapter (LoRA init + task head) from a seed.",
)
@click.option("--labels", default=None, help="Comma-separated class labels (seq-cls), in label-id order.")
@click.option("--target-modules", default=None, help="Comma-separated module names LoRA trains, e.g. q_proj,v_proj.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="Rank of the initial adapter.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="Alpha of the initial adapter.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial adapter.")
@click.option("--strategy", type=choice(Strategy), default=Strategy.FEDEX_LORA.value, show_default=True)
@click.option(
    "--weights",
    type=choice(WeightPolicy),
    default=WeightPolicy.DATASET_SIZE.value,
    show_default=True,
    help="Client weights: their dataset-size claims, uniform, or what `client add` registered.",
)
@click.option(
    "--max-client-weight",
    type=float,
    default=0.5,
    show_default=True,
    help="No client gets more of a round than this (or 1/N when larger).",
)
@click.option(
    "--missing-modules",
    type=choice(MissingModules),
    default=MissingModules.ZERO.value,
    show_default=True,
    help="A module a client did not train: a zero update, or renormalise over holders.",
)
@click.option(
    "--max-update-norm",
    type=float,
    default=1e4,
    show_default=True,
    help="Refuse deltas with a module update ||s·B·A||_F above this.",
)
@click.option(
    "--prox-mu",
    type=float,
    default=0.0,
    show_default=True,
    help="FedProx: every client's local training is pulled toward the round's global model with this weight "
    "(published with the federation; against drift on skewed client data; 0: off).",
)
@click.option(
    "--scaffold",
    is_flag=True,
    help="SCAFFOLD control variates (published with the federation): every client corrects its local steps by "
    "the server variate each round publishes next to its adapter, against drift on skewed client data. Needs "
    "an initial adapter (--task ... --lora-rank) and one rank for every client; not with stack or server DP.",
)
@click.option(
    "--personal-heads",
    is_flag=True,
    help="seq-cls: every client keeps its own task head, trained on its own data and never uploaded; only "
    "the LoRA body is aggregated. The published head stays round 0's (`export --head own` takes a client's).",
)
@click.option(
    "--server-opt",
    type=choice(ServerOptimizer),
    default=ServerOptimizer.NONE.value,
    show_default=True,
    help="Server optimiser on each round's exact update (the aggregate minus the global clients started "
    "from): momentum (fedavgm) or adaptive steps (fedadam, fedyogi), as in Reddi et al. 2021. Not with stack.",
)
@click.option(
    "--server-lr",
    type=float,
    default=None,
    help="The server optimiser's step size.  [default: 1 for fedavgm, 0.01 for fedadam and fedyogi]",
)
@click.option("--server-momentum", type=float, default=0.9, show_default=True, help="fedavgm's momentum.")
@click.option("--server-beta1", type=float, default=0.9, show_default=True, help="fedadam/fedyogi's first moment.")
@click.option("--server-beta2", type=float, default=0.99, show_default=True, help="fedadam/fedyogi's second moment.")
@click.option("--server-tau", type=float, default=1e-3, show_default=True, help="fedadam/fedyogi's adaptivity floor τ.")
@click.option(
    "--relative-clip",
    type=float,
    default=None,
    help="Clip each client's update, per module and as a whole, to K times the round's median client"
    " norm (the lower median: with two clients, the smaller), so no outlier owns a round; rounds where"
    " nobody exceeds it are unchanged. 0: off. Not applied with differential privacy. Default 10 (sync),"
    " off in buffered mode (not built there).",
)
@click.option("--round-timeout", type=int, default=0, help="Seconds until the deadline sweep closes a round.")
@click.option("--min-quorum", type=int, default=0, help="Deltas a deadline close needs (default: the quorum).")
@click.option(
    "--expire-policy",
    type=choice(ExpirePolicy),
    default=ExpirePolicy.EXTEND.value,
    show_default=True,
    help="At the deadline with fewer than min-quorum deltas: wait another period, or expire the round.",
)
@click.option(
    "--clients-per-round",
    type=int,
    default=0,
    help="Client sampling: the workers draw this many of the active clients for each round (0: all); "
    "needs --round-timeout and --expire-policy expire, so a drawn client that never uploads cannot stall it.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=10,
    show_default=True,
    help="Compact the cumulative correction into a snapshot every C rounds (0: only on demand).",
)
@click.option("--snapshot-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--out-rank", type=int, default=0, help="svd strategy output rank (default: largest client rank).")
@click.option("--clip-norm", type=float, default=0.0, help="Bound each client's update norm ||s·B·A|| (0: off).")
@click.option("--screen-outliers", is_flag=True, help="Exclude median/MAD outliers before aggregating.")
@click.option("--outlier-z", type=float, default=3.5, show_default=True)
@click.option("--robust-aggregate", type=choice(RobustAggregate), default=RobustAggregate.MEAN.value, show_default=True)
@click.option("--trim", type=int, default=0, help="Clients dropped by --robust-aggregate trimmed.")
@click.option("--dp-epsilon", type=float, default=None, help="Server-side client-level DP budget over --dp-rounds.")
@click.option("--dp-rounds", type=int, default=1, show_default=True)
@click.option("--dp-delta", type=float, default=1e-5, show_default=True)
@click.option("--dp-noise-multiplier", type=float, default=0.0, help="Set the noise directly instead of --dp-epsilon.")
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="Secure aggregation (SecAgg+): clients mask their updates so the workers see only the sum. "
    "Linear strategies only (ffa-lora, rolora); a round's cohort is fixed when it opens.",
)
@click.option("--secagg-neighbours", type=int, default=0, help="K: each client's masking neighbours (0: default).")
@click.option("--secagg-threshold", type=int, default=0, help="T: shares that recover a client's masks (0: K/2+1).")
@click.option(
    "--secagg-phase-timeout", type=int, default=300, show_default=True, help="Seconds each secure phase stays open."
)
@click.pass_context  # type: ignore[arg-type]
@one_line_errors
def federation_create(ctx: click.Context, **params: Any) -> None:
    """Create federation NAME, declare its model and open round 1."""
    cfg, initial = build_federation(client_of(ctx), **params)
    if cfg.buffered:
        click.echo(
            f"federation {cfg.name} created, buffered: flush every {cfg.quorum} deltas, max staleness "
            f"{cfg.max_staleness}, staleness weight {cfg.staleness_weight}, server lr {cfg.server_step_size:g}, "
            f"strategy {cfg.strategy}; buffer 1 is open"
        )
    else:
        click.echo(
            f"federation {cfg.name} created: quorum {cfg.quorum}, strategy {cfg.strategy}, weights "
            f"{cfg.weights}; round 1 is open"
        )
    if cfg.secure_aggregation:
        click.echo(
            f"secure aggregation: K {cfg.secagg_neighbours or 'default'}, T {cfg.secagg_threshold or 'default'}, "
            f"{cfg.secagg_phase_timeout}s per phase; clients run `chorus-mq upload`/`train`, which drive the phases"
        )
    if cfg.server_opt != ServerOptimizer.NONE:
        click.echo(f"server optimiser: {server_opt_text(cfg.server_opt_settings())}")
    if initial:
        click.echo("round 0 holds the initial adapter: clients start round 1 from it (`chorus-mq pull --round 0`)")
    if cfg.dp_noise_multiplier:
        click.echo(
            f"differential privacy: noise multiplier {cfg.dp_noise_multiplier:.4f}, clip {cfg.clip_norm}, "
            f"delta {cfg.dp_delta}"
        )


def server_opt_text(settings: dict[str, Any]) -> str:
    """``fedadam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)``: the optimiser and the settings it uses."""
    rest = ", ".join(f"{k} {v:g}" for k, v in settings.items() if k != "optimizer")
    return f"{settings['optimizer']} ({rest})"


@federation.command("list")
@click.pass_context
@one_line_errors
def federation_list(ctx: click.Context) -> None:
    """The federations on this Redis."""
    for name in client_of(ctx).state.federations():
        click.echo(name)


def build_federation(
    sdk: ChorusClient,
    *,
    name: str,
    base_model: str,
    quorum: int | None,
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
    mode: str = FederationMode.SYNC.value,
    buffer: int | None = None,
    min_buffer: int | None = None,
    flush_timeout: int | None = None,
    **options: Any,
) -> tuple[FederationConfig, bool]:
    """Create the federation from ``federation create``'s options (``options``: the FederationConfig
    fields the CLI passes through as they are); returns its config and whether round 0 holds an
    initial adapter."""
    from ..adapters import model_decl_from_adapter, model_decl_from_dir
    from ..federation import canonical_decl

    quorum = _buffered_options(options, mode, quorum, buffer, min_buffer, flush_timeout)
    if dp_epsilon is not None:
        from ..aggregation.dp import noise_for_budget

        options["dp_noise_multiplier"] = noise_for_budget(dp_epsilon, options["dp_delta"], dp_rounds)
    targets = tuple(t.strip() for t in target_modules.split(",") if t.strip()) if target_modules else ()
    label_list = tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else ()
    task_type = TaskType(task) if task else None
    model_dir = Path(base_model)
    if task_type is not None and not model_dir.is_dir():
        from ..training.data import resolve_model

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
        from ..training.model import build_initial_adapter

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
                fed_sb=strategy_spec(options.get("strategy", Strategy.FEDEX_LORA)).sandwich,
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


def _buffered_options(
    options: dict[str, Any],
    mode: str,
    quorum: int | None,
    buffer: int | None,
    min_buffer: int | None,
    flush_timeout: int | None,
) -> int:
    """The quorum, with a buffered federation's flags mapped onto the round machine's fields (a buffer is a
    round: K is its quorum, --min-buffer its min-quorum, --flush-timeout its deadline); ConfigError for a
    flag of the other mode."""
    options["mode"] = FederationMode(mode)
    options["secure_aggregation"] = bool(options.get("secure_aggregation"))
    if options.get("relative_clip") is None:
        # off where it cannot run: buffered (not built), secure aggregation (no client's norm is seen)
        off = options["mode"] == FederationMode.BUFFERED or options["secure_aggregation"]
        options["relative_clip"] = 0.0 if off else 10.0
    buffered_only = {
        "--buffer": buffer,
        "--min-buffer": min_buffer,
        "--flush-timeout": flush_timeout,
        "--max-staleness": options.get("max_staleness"),
        "--staleness-weight": options.get("staleness_weight"),
        "--max-per-client-per-flush": options.get("max_per_client_per_flush"),
    }
    if options["mode"] != FederationMode.BUFFERED:
        given = [flag for flag, value in buffered_only.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} applies only to --mode buffered")
        if quorum is None:
            raise ConfigError("--quorum is required (deltas that close a round)")
        for name in ("max_staleness", "staleness_weight", "max_per_client_per_flush"):
            options.pop(name, None)
        return quorum
    if buffer is None:
        raise ConfigError("--mode buffered needs --buffer K (accepted deltas per flush)")
    if quorum is not None or options.get("min_quorum") or options.get("round_timeout"):
        raise ConfigError(
            "--mode buffered takes --buffer, --min-buffer and --flush-timeout instead of --quorum, --min-quorum "
            "and --round-timeout"
        )
    if min_buffer is not None and not 1 <= min_buffer <= buffer:
        raise ConfigError(f"--min-buffer must be between 1 and --buffer {buffer}")
    if flush_timeout is not None and flush_timeout < 0:
        raise ConfigError("--flush-timeout cannot be negative (0: flush only at K deltas)")
    options["min_quorum"] = 1 if min_buffer is None else min_buffer
    options["round_timeout"] = flush_timeout or 0
    for name in ("max_staleness", "staleness_weight", "max_per_client_per_flush"):
        if options.get(name) is None:
            options.pop(name, None)
    return buffer


def _task_from_peft(peft_task: str) -> TaskType | None:
    from ..names import PEFT_TASK_TYPES

    for ours, theirs in PEFT_TASK_TYPES.items():
        if theirs == peft_task:
            return ours
    return None
