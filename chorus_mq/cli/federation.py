"""``chorus-mq federation create|list``: declare a federation's model, build its config, open round 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..create_request import BufferFlags, ConfigFields, CreateRequest, DpBudget, ModelSource, create_federation
from ..names import (
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
from .options import choice, client_of, csv, one_line_errors


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
    " off in buffered mode (where K bounds each delta's update against its own base version).",
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
@click.option(
    "--clip-norm",
    type=float,
    default=0.0,
    help="Bound each client's update norm ||s·B·A|| (buffered: each delta's update against its base version; 0: off).",
)
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
@click.pass_context
@one_line_errors
def federation_create(
    ctx: click.Context,
    *,
    name: str,
    base_model: str,
    quorum: int | None,
    mode: str,
    buffer: int | None,
    min_buffer: int | None,
    flush_timeout: int | None,
    max_staleness: int | None,
    staleness_weight: str | None,
    max_per_client_per_flush: int | None,
    reference_adapter: str | None,
    initial_adapter: str | None,
    task: str | None,
    labels: str | None,
    target_modules: str | None,
    lora_rank: int,
    lora_alpha: float,
    seed: int,
    strategy: str,
    weights: str,
    max_client_weight: float,
    missing_modules: str,
    max_update_norm: float,
    prox_mu: float,
    scaffold: bool,
    personal_heads: bool,
    server_opt: str,
    server_lr: float | None,
    server_momentum: float,
    server_beta1: float,
    server_beta2: float,
    server_tau: float,
    relative_clip: float | None,
    round_timeout: int,
    min_quorum: int,
    expire_policy: str,
    clients_per_round: int,
    checkpoint_every: int,
    snapshot_dtype: str,
    out_rank: int,
    clip_norm: float,
    screen_outliers: bool,
    outlier_z: float,
    robust_aggregate: str,
    trim: int,
    dp_epsilon: float | None,
    dp_rounds: int,
    dp_delta: float,
    dp_noise_multiplier: float,
    secure_aggregation: bool,
    secagg_neighbours: int,
    secagg_threshold: int,
    secagg_phase_timeout: int,
) -> None:
    """Create federation NAME, declare its model and open round 1."""
    request = CreateRequest(
        name=name,
        model=ModelSource(
            base_model=base_model,
            reference_adapter=None if reference_adapter is None else Path(reference_adapter),
            initial_adapter=None if initial_adapter is None else Path(initial_adapter),
            task=None if task is None else TaskType(task),
            labels=csv(labels) or (),
            target_modules=csv(target_modules) or (),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            seed=seed,
        ),
        quorum=quorum,
        mode=FederationMode(mode),
        buffering=BufferFlags(
            buffer=buffer,
            min_buffer=min_buffer,
            flush_timeout=flush_timeout,
            max_staleness=max_staleness,
            staleness_weight=staleness_weight,
            max_per_client_per_flush=max_per_client_per_flush,
        ),
        relative_clip=relative_clip,
        dp_budget=None if dp_epsilon is None else DpBudget(dp_epsilon, dp_rounds),
        fields=ConfigFields(
            strategy=Strategy(strategy),
            weights=WeightPolicy(weights),
            max_client_weight=max_client_weight,
            missing_modules=MissingModules(missing_modules),
            max_update_norm=max_update_norm,
            prox_mu=prox_mu,
            scaffold=scaffold,
            personal_heads=personal_heads,
            server_opt=ServerOptimizer(server_opt),
            server_lr=server_lr,
            server_momentum=server_momentum,
            server_beta1=server_beta1,
            server_beta2=server_beta2,
            server_tau=server_tau,
            round_timeout=round_timeout,
            min_quorum=min_quorum,
            expire_policy=ExpirePolicy(expire_policy),
            clients_per_round=clients_per_round,
            checkpoint_every=checkpoint_every,
            snapshot_dtype=SnapshotDtype(snapshot_dtype),
            out_rank=out_rank,
            clip_norm=clip_norm,
            screen_outliers=screen_outliers,
            outlier_z=outlier_z,
            robust_aggregate=RobustAggregate(robust_aggregate),
            trim=trim,
            dp_noise_multiplier=dp_noise_multiplier,
            dp_delta=dp_delta,
            secure_aggregation=secure_aggregation,
            secagg_neighbours=secagg_neighbours,
            secagg_threshold=secagg_threshold,
            secagg_phase_timeout=secagg_phase_timeout,
        ),
    )
    created = create_federation(client_of(ctx), request)
    cfg = created.config
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
    if created.initial_adapter:
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
