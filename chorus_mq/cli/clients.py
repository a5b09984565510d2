"""``chorus-mq client ...`` (register, list, revoke, the S3 policy) and ``chorus-mq acl sync``: a federation's
clients, for operators."""

from __future__ import annotations

import dataclasses

import click

from ..errors import ConfigError
from .options import client_of, echo_json, federation_option, json_option, one_line_errors, settings_of


@click.group("client")
def client_group() -> None:
    """Register, list and revoke a federation's clients (operators)."""


@client_group.command("add")
@click.argument("name")
@federation_option()
@click.option("--weight", type=float, default=None, help="The client's weight under --weights registered.")
@click.option(
    "--dataset-size",
    type=float,
    default=None,
    help="The client's dataset size, registered by the operator (--weights registered).",
)
@click.pass_context
@one_line_errors
def client_add(
    ctx: click.Context, name: str, federation: str, weight: float | None, dataset_size: float | None
) -> None:
    """Register client NAME: prints its secret and its Redis URL once."""
    creds = client_of(ctx).add_client(federation, name, weight=weight, dataset_size=dataset_size)
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
@federation_option()
@json_option()
@click.pass_context
@one_line_errors
def client_list(ctx: click.Context, federation: str, as_json: bool) -> None:
    """The federation's clients: active or revoked, registered weight and dataset size."""
    rows = client_of(ctx).clients(federation).list()
    if as_json:
        echo_json([dataclasses.asdict(r) for r in rows])
        return
    for c in rows:
        extra = "".join(f" {k} {v:g}" for k, v in (("weight", c.weight), ("dataset-size", c.dataset_size)) if v)
        click.echo(f"{c.client_id}\t{'revoked' if c.revoked else 'active'}{extra}")


@client_group.command("revoke")
@click.argument("name")
@federation_option()
@click.pass_context
@one_line_errors
def client_revoke(ctx: click.Context, name: str, federation: str) -> None:
    """Revoke client NAME: its records stop verifying, its Redis user is deleted, and its delta leaves the
    open round (a round already aggregating keeps it)."""
    sdk = client_of(ctx)
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
@federation_option()
@click.option("--minio", is_flag=True, help="Print the `mc admin` commands for MinIO instead of the IAM policy.")
@click.pass_context
@one_line_errors
def client_s3_policy(ctx: click.Context, name: str, federation: str, minio: bool) -> None:
    """The least-privilege S3 policy for client NAME (its own upload prefix; read round results)."""
    from ..store import split_s3_url
    from ..store.policy import client_policy, minio_commands

    settings = settings_of(ctx)
    if not settings.store.startswith("s3://"):
        raise ConfigError("the store is not s3://; a file:// store needs no S3 credentials")
    bucket, prefix = split_s3_url(settings.store)
    if minio:
        for line in minio_commands(bucket, prefix, federation, name):
            click.echo(line)
    else:
        echo_json(client_policy(bucket, prefix, federation, name))


@click.group("acl")
def acl_group() -> None:
    """Per-client Redis users (operators)."""


@acl_group.command("sync")
@federation_option()
@click.pass_context
@one_line_errors
def acl_sync(ctx: click.Context, federation: str) -> None:
    """Re-create every active client's Redis user (after a Redis restart without a persisted ACL file)."""
    from ..state.acl import Acl

    sdk = client_of(ctx)
    report = Acl(sdk.redis).sync(federation, sdk.clients(federation))
    click.echo(f"{len(report.granted)} client users in place for {federation}; {len(report.removed)} removed")
