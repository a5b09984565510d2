"""``chorus-mq train`` and ``chorus-mq export``: a client's side of a federation (the code is ``training/``).

Nothing heavy is imported here: torch, transformers and peft load when a command runs, so
``chorus-mq --help`` stays fast.
"""

from __future__ import annotations

import json as json_lib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError
from ..names import DEFAULT_LOCAL_LR, DPAccountant, ExportDtype, HeadChoice, LocalOptimizer, TaskType
from .options import balance_labels_option, client_of, csv, federation_option, json_option, one_line_errors

if TYPE_CHECKING:
    from ..training.records import RoundRecord


def _print_phases(logger: logging.Logger) -> None:
    """Print ``train``'s phase lines on stderr, so a run outside a terminal (or under --json, whose records
    stay alone on stdout) is never silent for minutes."""
    if any(getattr(h, "chorus_phases", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("train: %(message)s"))
    handler.chorus_phases = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _format(record: RoundRecord) -> str:
    parts = [f"round {record.round} {record.state} ({record.upload})", f"local loss {record.local_loss:.4f}"]
    if record.eval_accuracy is not None and record.eval_loss is not None:
        parts.append(f"eval accuracy {record.eval_accuracy:.4f} loss {record.eval_loss:.4f}")
    parts.append(f"uploaded {record.upload_bytes / 1024:.0f} KiB")
    if record.epsilon is not None:
        parts.append(f"epsilon {record.epsilon:.3f}")
    parts.append(f"{record.seconds:.1f}s")
    return ", ".join(parts)


@click.command("train")
@federation_option("Federation to take part in.")
@click.option("--client-id", required=True, help="This client's registered id.")
@click.option(
    "--secret",
    envvar="CHORUS_CLIENT_SECRET",
    default=None,
    help="This client's signing secret (or CHORUS_CLIENT_SECRET; `client add` printed it).",
)
@click.option(
    "--model",
    "model",
    default=None,
    help="The base model: a local directory (config.json + safetensors + tokenizer) or 'minilm'.  "
    "[default: the federation's base model, where it is available here]",
)
@click.option(
    "--data",
    required=True,
    help="Training data: CSV, JSON Lines, Parquet, a saved datasets directory, or 'rotten-tomatoes'.",
)
@click.option("--text-column", default=None, help="Column holding the text.  [default: text]")
@click.option(
    "--label-column",
    default=None,
    help="Column holding the label (seq-cls), a name from the federation's labels or its index.  [default: label]",
)
@click.option(
    "--task",
    type=click.Choice(TaskType.values()),
    default=None,
    help="seq-cls or causal-lm (default: the federation's task).",
)
@click.option("--rounds", type=int, default=1, show_default=True, help="Complete rounds to take part in.")
@click.option("--steps-per-round", type=int, default=None, help="Optimizer steps per round (or --epochs).")
@click.option("--epochs", type=float, default=None, help="Passes over the data per round (default: 1).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per step (DP: expected).")
@click.option("--lr", type=float, default=DEFAULT_LOCAL_LR, show_default=True, help="Learning rate.")
@click.option(
    "--optimizer",
    type=click.Choice(LocalOptimizer.values()),
    default=LocalOptimizer.ADAMW.value,
    show_default=True,
    help="Local optimizer.",
)
@balance_labels_option(
    "seq-cls: logit adjustment by this client's label frequencies; auto: when they are skewed (not "
    "with --dp-epsilon). A bare --balance-labels means on."
)
@click.option(
    "--prox-mu",
    type=float,
    default=None,
    help="FedProx: pull local training toward the round's global model with this weight (default: the "
    "federation's --prox-mu).",
)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text, truncated.")
@click.option(
    "--lora-rank",
    type=int,
    default=None,
    help="LoRA rank to train (default: the global adapter's). A lower rank trains the global adapter's top "
    "directions and keeps the rest frozen and uploaded with its update, so its start is exact too.",
)
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha with --lora-rank (default: 2 x rank).")
@click.option(
    "--target-modules",
    default=None,
    help="Comma-separated LoRA targets, for a causal-lm federation without an initial adapter.",
)
@click.option("--eval-data", default=None, help="Held-out data (same formats): evaluate each round's global model.")
@click.option(
    "--dp-epsilon",
    type=float,
    default=None,
    help="Client-side DP-SGD: the epsilon this client may spend over all --rounds.",
)
@click.option(
    "--share-stats/--no-share-stats",
    default=None,
    help="Send this client's label counts and its evaluation of the global model it starts from (with "
    "--eval-data) with each upload; `status` shows them to the federation.  [default: on, off with --dp-epsilon]",
)
@click.option("--dp-delta", type=float, default=1e-5, show_default=True, help="DP delta.")
@click.option("--dp-clip", type=float, default=1.0, show_default=True, help="Per-example gradient norm bound.")
@click.option(
    "--dp-accountant",
    type=click.Choice(DPAccountant.values()),
    default=DPAccountant.RDP.value,
    show_default=True,
    help="Accountant calibrating the noise (Opacus' RDP or PRV).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="This client's work dir (pulled model, trained adapters, privacy ledger); a restart with the "
    "same one resumes.  [default: ./chorus-train/FEDERATION/CLIENT]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of batch order and new LoRA rows.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait for a round to open or end.")
@json_option("Print one JSON record per round, no progress bars.")
@click.pass_context
@one_line_errors
def train(
    ctx: click.Context,
    *,
    federation: str,
    client_id: str,
    secret: str | None,
    model: str | None,
    data: str,
    text_column: str | None,
    label_column: str | None,
    task: str | None,
    rounds: int,
    steps_per_round: int | None,
    epochs: float | None,
    batch_size: int,
    lr: float,
    optimizer: str,
    balance_labels: str,
    prox_mu: float | None,
    max_length: int,
    lora_rank: int | None,
    lora_alpha: float | None,
    target_modules: str | None,
    eval_data: str | None,
    share_stats: bool | None,
    dp_epsilon: float | None,
    dp_delta: float,
    dp_clip: float,
    dp_accountant: str,
    workdir: str | None,
    seed: int,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Run a federation from this client's side: train locally, upload, wait, pull, repeat.

    Each round starts from the exact global model of the latest complete round (base model +
    cumulative residual in float32 + global adapter). Killed and restarted with the same
    --workdir, it resumes at the right round; a re-upload is answered 'duplicate'.
    """
    from ..training.dp import DPConfig
    from ..training.driver import TrainJob, run_train_job
    from ..training.driver import log as phase_log

    _print_phases(phase_log)
    dp = DPConfig(dp_epsilon, dp_delta, dp_clip, DPAccountant(dp_accountant)) if dp_epsilon is not None else None
    job = TrainJob(
        federation=federation,
        client_id=client_id,
        model_dir=model,
        data=data,
        text_column=text_column,
        label_column=label_column,
        task=task,
        rounds=rounds,
        steps_per_round=steps_per_round,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        balance_labels=balance_labels,
        prox_mu=prox_mu,
        max_length=max_length,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        target_modules=csv(target_modules),
        eval_data=eval_data,
        share_stats=share_stats,
        dp=dp,
        seed=seed,
        json=as_json,
        workdir=Path(workdir) if workdir else Path("chorus-train") / federation / client_id,
        timeout=timeout,
    )
    records = run_train_job(client_of(ctx, secret), job)
    for record in records:
        click.echo(json_lib.dumps(record.to_dict(), sort_keys=True) if as_json else _format(record))


@click.command("export")
@federation_option("Federation to export a round of (pulls it).", required=False)
@click.option("--round", "round_", type=int, default=None, help="Round to export (default: the latest complete).")
@click.option(
    "--from",
    "from_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Export an already pulled directory instead of pulling.",
)
@click.option(
    "--model",
    "model",
    default=None,
    help="The base model directory (or 'minilm').  [default: the federation's base model, where it is available "
    "here; required with --from]",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="New directory for the standalone model (AutoModelFor....from_pretrained loads it).",
)
@click.option(
    "--dtype",
    type=click.Choice(ExportDtype.values()),
    default=ExportDtype.FLOAT32.value,
    show_default=True,
    help="Weight dtype (merged in float32 first).",
)
@click.option(
    "--task",
    type=click.Choice(TaskType.values()),
    default=None,
    help="seq-cls or causal-lm (default: the federation's, or the pulled adapter's).",
)
@click.option("--labels", default=None, help="With --from: comma-separated label names for the model config.")
@click.option(
    "--head",
    type=click.Choice(HeadChoice.values()),
    default=HeadChoice.GLOBAL.value,
    show_default=True,
    help="The task head: the federation's published one, or (--personal-heads federations) this client's own, "
    "from its train work dir; --round then defaults to the round that head was trained in.",
)
@click.option("--client-id", default=None, help="With --head own: the client (its work dir is the train default).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --head own: the client's train work dir.  [default: ./chorus-train/FEDERATION/CLIENT]",
)
@click.option("--secret", envvar="CHORUS_CLIENT_SECRET", default=None, help="Client secret, if Redis needs one.")
@click.pass_context
@one_line_errors
def export(
    ctx: click.Context,
    *,
    federation: str | None,
    round_: int | None,
    from_dir: str | None,
    model: str | None,
    output: str,
    dtype: str,
    task: str | None,
    labels: str | None,
    head: str,
    client_id: str | None,
    workdir: str | None,
    secret: str | None,
) -> None:
    """Write a round's model as a standalone transformers model: base + cumulative residual + adapter merged.

    With --head own, a --personal-heads client's model: the round's body with its own task head.
    """
    import tempfile

    from ..training.data import model_of_federation, resolve_model
    from ..training.export import export_model

    if (federation is None) == (from_dir is None):
        raise ConfigError("give exactly one of --federation F (to pull a round) and --from PULLED_DIR")
    if from_dir is not None and model is None:
        raise ConfigError("--from needs --model: a pulled directory does not say where its base model is")
    own = _own_head(HeadChoice(head), federation, client_id, workdir)
    if own is not None and round_ is None and from_dir is None:
        round_ = own.round  # the model this client evaluated and trains on next: that round's body, its head
    label_list = csv(labels)
    with tempfile.TemporaryDirectory(prefix="chorus-export-") as tmp:
        if federation is not None:
            sdk = client_of(ctx, secret)
            status = sdk.status(federation)
            model_dir = model_of_federation(model, status.base_model)
            pulled = Path(tmp)
            manifest = sdk.pull(federation, pulled, round_)
            task = task or status.task_type
            label_list = label_list or (tuple(status.labels) or None)
            what = f"round {getattr(manifest, 'round', round_)} of {federation}"
            if status.personal_heads and own is None:
                what += " (its task head is round 0's: clients keep their own; --head own exports one)"
        else:
            model_dir = resolve_model(str(model))
            pulled = Path(str(from_dir))
            task = task or _task_of_adapter(pulled)
            what = str(pulled)
        if task is None:
            raise ConfigError("the task is unknown: pass --task seq-cls or --task causal-lm")
        out = export_model(
            pulled,
            model_dir,
            Path(output),
            task=TaskType(task),
            dtype=dtype,
            labels=label_list,
            head=None if own is None else own.tensors,
        )
    whose = "" if own is None else f" with {own.client_id}'s own head (trained in round {own.round})"
    click.echo(f"exported {what}{whose} to {out} ({dtype})")


def _own_head(choice: HeadChoice, federation: str | None, client_id: str | None, workdir: str | None) -> Any:
    """The client's own head for ``--head own`` (None for ``global``)."""
    if choice == HeadChoice.GLOBAL:
        if client_id is not None or workdir is not None:
            raise ConfigError("--client-id and --workdir choose whose head --head own exports; --head is global")
        return None
    from ..training.heads import own_head

    if workdir is None:
        if federation is None or client_id is None:
            raise ConfigError(
                "--head own needs the client's train work dir: --workdir DIR, or --federation and --client-id"
            )
        workdir = str(Path("chorus-train") / federation / client_id)
    head = own_head(workdir, federation)
    if client_id is not None and head.client_id != client_id:
        raise ConfigError(f"the head in {workdir} is client {head.client_id!r}'s, not {client_id!r}'s")
    return head


def _task_of_adapter(pulled: Path) -> str | None:
    from ..names import ADAPTER_CONFIG, PEFT_TASK_TYPES

    config = json_lib.loads((pulled / ADAPTER_CONFIG).read_text())
    for ours, theirs in PEFT_TASK_TYPES.items():
        if config.get("task_type") == theirs:
            return str(ours)
    return None
