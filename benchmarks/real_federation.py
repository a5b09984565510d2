"""Federated LoRA on a real model and real data: MiniLM (BERT) sentiment on Rotten Tomatoes, fedavg vs fedex-lora.

Run: python benchmarks/real_federation.py [--clients 3 --rounds 2 --steps 25 --test 500 --seed 0]

This used to be ~170 lines of hand-written federation (data split, training loop, a head seeded
the same way by every party, the round driver, the starting model of round r+1). It is now one
call of ``chorus_mq.training.simulate_model.run_model_simulation`` - what ``chorus-mq simulate --model
minilm`` runs: the operator's initial adapter (LoRA and head, seeded) is round 0; each client
pulls the latest complete round, starts from the exact global model (base + cumulative residual
in float32 + global adapter) at its own rank (4, 8, 8, ... in turn), trains, and uploads through
the SDK; ingest and aggregation run as the Celery tasks, eagerly, on an embedded fakeredis and a
file:// store. Columns are explained in ``chorus_mq/training/simulate_model.py``; "exact err" is the
largest logit difference between the pulled global model and the weighted average of the
round's client models. For the MiniLM x Rotten Tomatoes comparison at scale (Dirichlet skew,
client sampling, svd and stack) see ``benchmarks/federated_accuracy.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chorus_mq from a checkout

from chorus_mq.training.simulate_model import run_model_simulation

STRATEGIES = ("fedavg", "fedex-lora")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="local steps per client round")
    parser.add_argument("--ranks", default="4,8,8", help="client LoRA ranks, cycled")
    parser.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | by:movie_name")
    parser.add_argument("--test", type=int, default=500, help="held-out reviews")
    parser.add_argument("--out", type=Path, default=None, help="write CSV, JSON and a plot here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    run_model_simulation(
        model="minilm",
        dataset="rotten-tomatoes",
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        ranks=[int(r) for r in args.ranks.split(",")],
        strategies=STRATEGIES,
        centralised=True,
        steps_per_round=args.steps,
        test_examples=args.test,
        out_dir=args.out,
        seed=args.seed,
        echo=lambda line: print(line, flush=True),
    )
    print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
