"""The services: ``worker``, ``beat`` and ``redis-gateway``."""

from __future__ import annotations

import os

import click

from ..names import WorkerRole
from .options import choice, one_line_errors


@click.command()
@click.option(
    "--role",
    type=choice(WorkerRole),
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
@one_line_errors
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
    from ..names import ROLE_QUEUES

    if metrics_port:
        # before prometheus_client is imported anywhere: every pool child writes its samples here
        import tempfile

        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="chorus-metrics-"))
    from ..aggregation.parallel import default_workers

    # the pool's processes share the cores: each aggregates that share of modules side by side, so the
    # machine is not oversubscribed (an explicit CHORUS_AGGREGATION_WORKERS wins)
    cores = default_workers()
    os.environ.setdefault("CHORUS_AGGREGATION_WORKERS", str(max(1, cores // (concurrency or cores))))
    from ..settings import get_settings
    from ..workers.app import get_app
    from ..workers.startup import check_redis_credentials, keep_functions_loaded

    settings = get_settings()
    check_redis_credentials(settings)
    keep_functions_loaded(settings)  # the bounded inbox append clients call
    app = get_app(settings)
    selected = queues or ",".join(q.value for q in ROLE_QUEUES[WorkerRole(role)])
    if metrics_port:
        from ..workers.metrics import serve
        from ..workers.runtime import current

        serve(metrics_port, broker=current().broker, queues=selected.split(","))
    argv = ["worker", "-Q", selected, "-l", loglevel, "--pool", pool, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@click.command()
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@one_line_errors
def beat(loglevel: str) -> None:
    """Sweep every few seconds: close rounds whose deadline passed, re-dispatch rounds whose worker died,
    request compactions. Safe to run twice; survives Redis restarts."""
    import logging

    from ..settings import get_settings
    from ..workers.beat import run_beat
    from ..workers.startup import check_redis_credentials

    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/beat] %(message)s")
    settings = get_settings()
    check_redis_credentials(settings)
    run_beat(settings)


@click.command("redis-gateway")
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
@one_line_errors
def redis_gateway(
    listen: str, upstream: str, per_source: int, max_connections: int, idle_timeout: float, loglevel: str
) -> None:
    """Relay clients to Redis with per-address and total connection limits; refuse XADD and oversized
    commands (clients append through Redis's bounded function). Workers connect to Redis directly."""
    import logging

    from ..gateway import GatewayLimits, run_gateway
    from ..settings import get_settings

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
