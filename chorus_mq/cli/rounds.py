"""Following and acting on rounds: ``status``, ``watch``, ``rounds``, ``round close|evict|abort``, ``compact``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ..errors import RoundFailed
from ..names import Factor
from .drift import drift_block
from .federation import server_opt_text
from .options import client_of, echo_json, federation_option, json_option, one_line_errors


@click.command()
@federation_option()
@json_option()
@click.pass_context
@one_line_errors
def status(ctx: click.Context, federation: str, as_json: bool) -> None:
    """Current round, its state, deltas received / quorum, latest complete round, privacy spent."""
    s = client_of(ctx).status(federation)
    if as_json:
        echo_json(s.to_dict())
        return
    click.echo(f"federation {s.federation} ({s.strategy}, base {s.base_model})")
    if s.personal_heads:
        click.echo("task heads: each client keeps its own (--personal-heads); the published head is round 0's")
    click.echo(f"round {s.current_round}: {s.state}, {s.deltas}/{s.quorum} deltas")
    if s.trainable == Factor.LORA_R:
        click.echo("clients train lora_R this round, between the published frame (lora_B and lora_A stay as published)")
    elif s.trainable:
        click.echo(f"clients train {s.trainable} this round; the other factor stays as published (checked bit for bit)")
    if s.secure:
        now = s.secure.get("round")
        click.echo(
            "secure aggregation: "
            + (
                f"phase {now['phase']}, cohort {len(now.get('cohort', []))}, K {now.get('neighbours')}, "
                f"T {now.get('threshold')}"
                if now
                else "the round's cohort is fixed once enough clients are registered"
            )
        )
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
        click.echo(f"server optimiser: {server_opt_text(s.server_opt)}")
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


@click.command()
@federation_option()
@json_option("One JSON object per line.")
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
@one_line_errors
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
    for event in client_of(ctx).watch(
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


@click.command()
@federation_option()
@json_option()
@click.option(
    "--detail",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="For the latest N rounds, per client: declared label counts, cosine to the aggregate (read from the "
    "round's manifest), and its evaluation of the global model it started from.",
)
@click.pass_context
@one_line_errors
def rounds(ctx: click.Context, federation: str, as_json: bool, detail: int) -> None:
    """Round history: state, deltas, timings, manifest; drift for the latest rounds."""
    sdk = client_of(ctx)
    rows = sdk.rounds(federation, cosines=detail)
    if as_json:
        echo_json([r.to_dict() for r in rows])
        return
    # "waited" is open -> aggregation (uploads, the quorum, a deadline); "aggregated" is the workers' part
    click.echo(f"{'round':>5}  {'state':<11} {'deltas':>6}  {'waited':>8}  {'aggregated':>10}  manifest")
    for r in rows:
        waited, aggregated = (f"{t:.1f}s" if t is not None else "-" for t in (r.waited, r.aggregated))
        line = f"{r.round:>5}  {r.state!s:<11} {r.n:>6}  {waited:>8}  {aggregated:>10}"
        click.echo(f"{line}  {r.manifest or r.reason or '-'}")
    for line in drift_block(rows[-detail:] if detail else [], sdk.state.config(federation).labels):
        click.echo(line)


@click.group("round")
def round_group() -> None:
    """Act on a round (operators)."""


@round_group.command("close")
@federation_option()
@click.option("--round", "round_", type=int, default=None)
@click.pass_context
@one_line_errors
def round_close(ctx: click.Context, federation: str, round_: int | None) -> None:
    """Close a round now and aggregate what it has (needs min-quorum deltas)."""
    r = client_of(ctx).close_round(federation, round_)
    click.echo(f"round {r.round} closed with {r.n} deltas; aggregating")


@round_group.command("evict")
@click.argument("client")
@federation_option()
@click.option("--round", "round_", type=int, default=None)
@click.option("--reason", default="", help="Shown in the delta_evicted event.")
@click.pass_context
@one_line_errors
def round_evict(ctx: click.Context, client: str, federation: str, round_: int | None, reason: str) -> None:
    """Remove CLIENT's delta from an open round."""
    r = client_of(ctx).evict(federation, client, round_=round_, reason=reason)
    click.echo(f"evicted {client} from round {r.round} ({r.n} deltas left)")


@round_group.command("abort")
@federation_option()
@click.option("--round", "round_", type=int, default=None)
@click.option("--reason", default="", help="Shown in the round_aborted event.")
@click.pass_context
@one_line_errors
def round_abort(ctx: click.Context, federation: str, round_: int | None, reason: str) -> None:
    """Abort an open or aggregating round: nothing of it is aggregated and the next round opens."""
    r = client_of(ctx).abort_round(federation, round_=round_, reason=reason)
    click.echo(f"round {r.round} aborted")


@click.command()
@federation_option()
@click.option("--round", "round_", type=int, default=None, help="Default: the latest complete round.")
@click.pass_context
@one_line_errors
def compact(ctx: click.Context, federation: str, round_: int | None) -> None:
    """Ask the workers for a snapshot of the cumulative correction (late joiners start from it)."""
    r = client_of(ctx).compact(federation, round_)
    click.echo(f"compaction of {federation} up to round {r} requested")
