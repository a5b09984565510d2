"""The ``chorus-mq`` command line: a thin layer over :class:`chorus_mq.client.ChorusClient`."""

from __future__ import annotations

import functools
import json
import sys
import time

import click

from .errors import ChorusError
from .settings import Settings


def _fail_cleanly(fn):
    """ChorusError -> one line on stderr and its exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChorusError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # services down etc.: still one line
            if type(exc).__module__.startswith(("redis", "botocore", "kombu")):
                click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
                sys.exit(8)
            raise

    return wrapper


def _settings(ctx: click.Context) -> Settings:
    overrides = {k: v for k, v in ctx.find_root().obj.items() if v is not None}
    return Settings(**overrides)


def _client(ctx: click.Context, secret: str | None = None):
    from .client import ChorusClient
    return ChorusClient(_settings(ctx), secret=secret)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@click.group()
@click.option("--redis-url", envvar="CHORUS_REDIS_URL", default=None, help="Redis for state and queue.")
@click.option("--store", envvar="CHORUS_STORE", default=None, help="s3://bucket/prefix or file:///path")
@click.version_option(package_name="chorus-mq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, store: str | None) -> None:
    """Exact federated LoRA aggregation over Redis, Celery and S3."""
    ctx.obj = {"redis_url": redis_url, "store": store}


# -- services --------------------------------------------------------------------------

@main.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default: cores).")
@click.option("--queues", "-Q", default="chorus.ingest,chorus.aggregate", show_default=True)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--pool", default="prefork", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker node name, e.g. w1@%h.")
@_fail_cleanly
def worker(concurrency, queues, loglevel, pool, hostname):
    """Start a Celery worker (same as `celery -A chorus_mq.workers.app worker`)."""
    from .workers.app import app
    argv = ["worker", "-Q", queues, "-l", loglevel, "--pool", pool, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@main.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@_fail_cleanly
def beat(loglevel):
    """Start the scheduler that closes rounds whose deadline passed (one active instance, via redbeat)."""
    from .workers.app import app
    app.start(["beat", "-S", "redbeat.RedBeatScheduler", "-l", loglevel, "--max-interval", "5"])


# -- federations -----------------------------------------------------------------------

@main.group()
def federation():
    """Create and inspect federations."""


@federation.command("create")
@click.argument("name")
@click.option("--base-model", required=True, help="Base model id the adapters are trained on.")
@click.option("--quorum", type=int, required=True, help="Deltas that close a round.")
@click.option("--strategy", type=click.Choice(["fedex-lora", "fedavg", "svd", "stack"]), default="fedex-lora",
              show_default=True)
@click.option("--round-timeout", type=int, default=0, help="Seconds until the deadline sweep closes a round.")
@click.option("--min-quorum", type=int, default=0, help="Deltas a deadline close needs (default: the quorum).")
@click.option("--expire-policy", type=click.Choice(["extend", "expire"]), default="extend", show_default=True,
              help="At the deadline with fewer than min-quorum deltas: wait another period, or expire the round.")
@click.option("--out-rank", type=int, default=0, help="svd strategy output rank (default: largest client rank).")
@click.option("--clip-norm", type=float, default=0.0, help="Bound each client's update norm ||s·B·A|| (0: off).")
@click.option("--screen-outliers", is_flag=True, help="Exclude median/MAD outliers before aggregating.")
@click.option("--outlier-z", type=float, default=3.5, show_default=True)
@click.option("--robust-aggregate", type=click.Choice(["mean", "trimmed", "geomedian"]), default="mean",
              show_default=True)
@click.option("--trim", type=int, default=0, help="Clients dropped by --robust-aggregate trimmed.")
@click.option("--dp-epsilon", type=float, default=None, help="Client-level DP budget over --dp-rounds rounds.")
@click.option("--dp-rounds", type=int, default=1, show_default=True)
@click.option("--dp-delta", type=float, default=1e-5, show_default=True)
@click.option("--dp-noise-multiplier", type=float, default=0.0, help="Set the noise directly instead of --dp-epsilon.")
@click.pass_context
@_fail_cleanly
def federation_create(ctx, name, base_model, quorum, dp_epsilon, dp_rounds, **options):
    """Create federation NAME and open round 1."""
    if dp_epsilon is not None:
        from .aggregation.dp import noise_for_budget
        options["dp_noise_multiplier"] = noise_for_budget(dp_epsilon, options["dp_delta"], dp_rounds)
    options["screen_outliers"] = int(options["screen_outliers"])
    cfg = _client(ctx).create_federation(name, base_model=base_model, quorum=quorum, **options)
    click.echo(f"federation {cfg.name} created: quorum {cfg.quorum}, strategy {cfg.strategy}; round 1 is open")
    if cfg.dp_noise_multiplier:
        click.echo(f"differential privacy: noise multiplier {cfg.dp_noise_multiplier:.4f}, clip {cfg.clip_norm}, "
                   f"delta {cfg.dp_delta}")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--adapter", "adapter", required=True, type=click.Path(exists=True),
              help="PEFT adapter directory or a .safetensors file with PEFT key names.")
@click.option("--client-id", required=True)
@click.option("--dataset-size", type=float, default=None, help="Examples trained on (aggregation weight).")
@click.option("--round", "round_", type=int, default=None, help="Round to upload to (default: the open one).")
@click.option("--lora-alpha", type=float, default=None, help="For a bare .safetensors: lora_alpha (default r).")
@click.option("--secret", envvar="CHORUS_CLIENT_SECRET", default=None, help="This client's secret (signs the message).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the worker's verdict.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.pass_context
@_fail_cleanly
def upload(ctx, federation, adapter, client_id, dataset_size, round_, lora_alpha, secret, wait, timeout):
    """Validate an adapter locally, store it, enqueue it, and wait for the verdict."""
    res = _client(ctx, secret).upload(federation, adapter, client_id, dataset_size=dataset_size, round_=round_,
                                      wait=wait, timeout=timeout, lora_alpha=lora_alpha)
    if res.status == "queued":
        click.echo(f"queued upload {res.upload_id} (sha256 {res.sha256[:12]})")
    else:
        click.echo(f"{res.status}: {client_id} in round {res.round} ({res.n} deltas) sha256 {res.sha256[:12]}")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_fail_cleanly
def status(ctx, federation, as_json):
    """Current round, its state, deltas received / quorum, latest complete round."""
    s = _client(ctx).status(federation)
    if as_json:
        _echo_json(s)
        return
    click.echo(f"federation {s['federation']} ({s['strategy']}, base {s['base_model']})")
    click.echo(f"round {s['current_round']}: {s['state']}, {s['deltas']}/{s['quorum']} deltas")
    if s["deadline"]:
        click.echo(f"deadline in {max(0, s['deadline'] - time.time()):.0f}s (min quorum {s['min_quorum']})")
    click.echo(f"latest complete round: {s['latest_complete'] or 'none yet'}")
    for client, spent in sorted(s.get("privacy", {}).items()):
        click.echo(f"privacy {client}: epsilon {spent['epsilon']:.3f} at delta {spent['delta']:g} "
                   f"over {spent['rounds']} rounds")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--from-start", is_flag=True, help="Replay every event from the beginning.")
@click.option("--after", default=None, help="Resume after this event id (the `id` of the last event seen).")
@click.option("--until-round", type=int, default=None, help="Exit when this round is complete (non-zero if failed).")
@click.option("--timeout", type=float, default=None)
@click.pass_context
@_fail_cleanly
def watch(ctx, federation, as_json, from_start, after, until_round, timeout):
    """Print round events as they happen; survives Redis restarts, resumable with --after."""
    last = None
    for event in _client(ctx).watch(federation, from_start=from_start, after=after, until_round=until_round,
                                    timeout=timeout):
        last = event
        if as_json:
            click.echo(json.dumps(event, sort_keys=True))
        else:
            extra = {k: v for k, v in event.items() if k not in ("type", "federation", "round", "ts", "id")}
            click.echo(f"{time.strftime('%H:%M:%S', time.localtime(event['ts']))} round {event['round']} "
                       f"{event['type']} {json.dumps(extra, sort_keys=True) if extra else ''}".rstrip())
        sys.stdout.flush()
    if until_round and last and last["type"] == "round_failed":
        sys.exit(10)


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False))
@click.option("--round", "round_", type=int, default=None, help="Default: the latest complete round.")
@click.pass_context
@_fail_cleanly
def pull(ctx, federation, output, round_):
    """Write the global adapter (PEFT-loadable), residuals and manifest of a round into OUTPUT."""
    manifest = _client(ctx).pull(federation, output, round_)
    click.echo(f"round {manifest['round']} ({manifest['strategy']}, {len(manifest['clients'])} clients) -> {output}")


@main.command()
@click.option("--federation", "-f", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_fail_cleanly
def rounds(ctx, federation, as_json):
    """Round history: state, deltas, timings, result objects."""
    rows = _client(ctx).rounds(federation)
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'round':>5}  {'state':<11} {'deltas':>6}  {'took':>8}  manifest")
    for r in rows:
        took = r.get("completed_at", 0) - r.get("opened_at", 0) if r.get("completed_at") else None
        click.echo(f"{r['round']:>5}  {r['state']:<11} {r['n']:>6}  "
                   f"{(f'{took:.1f}s' if took is not None else '-'):>8}  {r.get('manifest', '-')}")


@main.group("round")
def round_group():
    """Act on a round."""


@round_group.command("close")
@click.option("--federation", "-f", required=True)
@click.option("--round", "round_", type=int, default=None)
@click.pass_context
@_fail_cleanly
def round_close(ctx, federation, round_):
    """Close a round now and aggregate what it has (needs min-quorum deltas)."""
    t = _client(ctx).close_round(federation, round_)
    click.echo(f"round closed with {t.n} deltas; aggregating (epoch {t.epoch})")


@main.group("client")
def client_group():
    """Register, list and revoke a federation's clients."""


@client_group.command("add")
@click.argument("name")
@click.option("--federation", "-f", required=True)
@click.pass_context
@_fail_cleanly
def client_add(ctx, name, federation):
    """Register client NAME; prints its secret once."""
    secret = _client(ctx).clients(federation).add(name)
    click.echo(f"client {name} registered in {federation}. Its secret (shown once, give it to the client as "
               f"CHORUS_CLIENT_SECRET):\n{secret}")


@client_group.command("list")
@click.option("--federation", "-f", required=True)
@click.pass_context
@_fail_cleanly
def client_list(ctx, federation):
    for c in _client(ctx).clients(federation).list():
        click.echo(f"{c['client_id']}\t{'revoked' if c['revoked'] else 'active'}")


@client_group.command("revoke")
@click.argument("name")
@click.option("--federation", "-f", required=True)
@click.pass_context
@_fail_cleanly
def client_revoke(ctx, name, federation):
    _client(ctx).clients(federation).revoke(name)
    click.echo(f"client {name} revoked")


@main.command()
@click.option("--clients", type=int, default=5, show_default=True)
@click.option("--rounds", "n_rounds", type=int, default=3, show_default=True)
@click.option("--strategy", type=click.Choice(["fedex-lora", "fedavg", "svd", "stack"]), default="fedex-lora",
              show_default=True)
@click.option("--compare", is_flag=True, help="Run fedavg and fedex-lora side by side.")
@click.option("--redis-url", "sim_redis", default=None, help="Real Redis instead of the embedded one.")
@click.option("--store", "sim_store", default=None, help="Store URL instead of a temporary file:// store.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def simulate(clients, n_rounds, strategy, compare, sim_redis, sim_store, seed, as_json):
    """Run a whole federation on embedded defaults, through the production code paths."""
    from .simulate import run_simulation
    strategies = ["fedavg", "fedex-lora"] if compare else [strategy]
    rows = run_simulation(clients=clients, rounds=n_rounds, strategies=strategies, redis_url=sim_redis,
                          store_url=sim_store, seed=seed, echo=None if as_json else click.echo)
    if as_json:
        _echo_json(rows)


if __name__ == "__main__":
    main()
