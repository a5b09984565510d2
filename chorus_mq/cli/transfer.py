"""The clients' commands: ``upload`` a delta, ``pull`` a round."""

from __future__ import annotations

import click

from .options import client_of, federation_option, one_line_errors


@click.command()
@federation_option()
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
@click.option(
    "--base-version",
    type=int,
    default=None,
    help="Buffered federations (required there): the version (round) the adapter was trained from.",
)
@click.option("--lora-alpha", type=float, default=None, help="For a bare .safetensors: lora_alpha (default r).")
@click.option(
    "--secret",
    envvar="CHORUS_CLIENT_SECRET",
    default=None,
    help="This client's secret (signs the record; default: the password in CHORUS_REDIS_URL).",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the worker's verdict.")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.option(
    "--secagg-state-dir",
    type=click.Path(file_okay=False),
    default=".chorus-secagg",
    show_default=True,
    help="Secure federations: where this client keeps its round keys between phases (run again to resume).",
)
@click.pass_context
@one_line_errors
def upload(
    ctx: click.Context,
    federation: str,
    adapter: str,
    client_id: str,
    dataset_size: float | None,
    round_: int | None,
    base_version: int | None,
    lora_alpha: float | None,
    secret: str | None,
    wait: bool,
    timeout: float,
    secagg_state_dir: str,
) -> None:
    """Validate an adapter locally, store it, append its signed record to the inbox, wait for the verdict.

    On a secure federation: take part in the round's secure aggregation, phase by phase, until it publishes."""
    res = client_of(ctx, secret).upload(
        federation,
        adapter,
        client_id,
        dataset_size=dataset_size,
        round_=round_,
        wait=wait,
        timeout=timeout,
        lora_alpha=lora_alpha,
        progress=True,
        base_version=base_version,
        secure_state_dir=secagg_state_dir,
        on_phase=lambda r, phase: click.echo(f"secagg_phase: round {r} {phase}"),
    )
    if res.status in ("summed", "dropped"):
        click.echo(f"{res.status}: {client_id} in secure round {res.round} ({res.n} inputs summed)")
    elif res.status == "queued":
        click.echo(f"queued upload {res.upload_id} (sha256 {res.sha256[:12]})")
    else:
        click.echo(f"{res.status}: {client_id} in round {res.round} ({res.n} deltas) sha256 {res.sha256[:12]}")


@click.command()
@federation_option()
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
@one_line_errors
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
    manifest = client_of(ctx).pull(
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
