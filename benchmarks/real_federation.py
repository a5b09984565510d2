"""Federated LoRA on a real model and real data: MiniLM (BERT) sentiment on Rotten Tomatoes, fedavg vs fedex-lora.

Run: python benchmarks/real_federation.py [--clients 3 --examples 400 --rounds 2 --epochs 2 --test 500 --seed 0]

Client i gets between 0.5x and 1.5x ``--examples`` reviews (so dataset-size weights differ), rank
4, 8, 8, ... and lora_alpha 8, 16, 32, ... in turn, and trains LoRA on query/value plus the
classifier head on CPU (tests/realdata.py). Uploads go through the SDK; the ingest and aggregate
Celery tasks run in this process, eagerly, on an embedded fakeredis and a file:// store, and the
global model is pulled back. Nothing is downloaded.

Rounds: round 1 starts from the base model, and both strategies aggregate the same round-1
uploads. In round r > 1 every client starts from its strategy's previous global model: base +
cumulative residual folded in fp32 (none for fedavg), with the pulled global adapter loaded
trainable as the LoRA init (so its rank and alpha replace the client's own), and trains
``--epochs`` more. Each strategy therefore follows its own trajectory.

Columns, per strategy and round, all on the same held-out reviews:
  global acc  the pulled global model (base + cumulative residual + global adapter)
  exact acc   the exact round update: the round's starting model + Σ wᵢ sᵢ Bᵢ Aᵢ (float64) with the
              clients' heads averaged, i.e. the weighted average of the client models
  logit err   max |logit difference| between those two models
  aggregate   the worker's aggregation time (the manifest's aggregation_seconds)
  client acc  each client's own model after its local training
The centralised baseline trains one rank-8 LoRA on every client's data pooled, for
epochs x rounds epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chorus_mq and tests.realdata from a checkout

from chorus_mq.client import ChorusClient  # noqa: E402
from chorus_mq.settings import Settings  # noqa: E402
from chorus_mq.store import open_store  # noqa: E402
from chorus_mq.workers import runtime  # noqa: E402
from tests import realdata as rd  # noqa: E402

STRATEGIES = ("fedavg", "fedex-lora")


@dataclass
class Row:
    strategy: str
    round: int
    global_acc: float
    exact_acc: float
    logit_err: float
    aggregate_s: float
    client_acc: list[float]


@contextlib.contextmanager
def embedded_sdk(workdir: Path):
    """A ChorusClient whose uploads run the real tasks in-process (fakeredis with Lua, file:// store)."""
    import fakeredis
    settings = Settings(redis_url="redis://embedded", store=f"file://{workdir}/store", eager=True,
                        spool_dir=str(workdir / "spool"), allow_unsigned=True)
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    rt = runtime.Runtime(settings, redis, open_store(settings.store, settings))
    runtime.install(rt)
    try:
        yield ChorusClient(settings, redis=redis, store=rt.store)
    finally:
        runtime.install(None)


def client_sizes(clients: int, examples: int) -> list[int]:
    """From 0.5x to 1.5x ``examples``, evenly spaced (mean ``examples``)."""
    if clients == 1:
        return [examples]
    return [round(examples * (0.5 + i / (clients - 1))) for i in range(clients)]


def train_round(start, split: rd.Split, out: Path, *, seed: int, epochs: int, init: Path | None = None):
    """Every client trains from ``start`` (and ``init``); returns the clients and their held-out accuracies."""
    clients = rd.train_clients(start, split.clients, out, seed=seed, epochs=epochs, init=init)
    return clients, [rd.accuracy(c.model, split.test) for c in clients]


def run_strategy(sdk: ChorusClient, strategy: str, base, split: rd.Split, sizes: list[int], first_round,
                 args: argparse.Namespace, workdir: Path) -> list[Row]:
    """One federation over ``args.rounds`` rounds; round 1 uploads ``first_round``'s clients (shared by strategies)."""
    federation = f"minilm-{strategy}"
    sdk.create_federation(federation, base_model="all-MiniLM-L6-v2", quorum=len(sizes), strategy=strategy)
    start, (clients, client_acc), pulled, rows = base, first_round, None, []
    for r in range(1, args.rounds + 1):
        if r > 1:
            clients, client_acc = train_round(start, split, workdir / f"{strategy}-r{r}", seed=args.seed * 100 + r,
                                              epochs=args.epochs, init=pulled)
        rd.upload_round(sdk, federation, clients, sizes)
        pulled = workdir / f"{strategy}-pulled-{r}"
        manifest = sdk.pull(federation, pulled, r)
        got = rd.logits(rd.global_model(base, pulled), split.test)
        want = rd.logits(rd.exact_model(start, clients, sizes), split.test)
        rows.append(Row(strategy, r, rd.accuracy(got, split.test), rd.accuracy(want, split.test),
                        rd.max_error(got, want), manifest["aggregation_seconds"], client_acc))
        start = rd.corrected_base(base, pulled)  # where the next round's clients begin
    return rows


def print_table(args: argparse.Namespace, sizes: list[int], base_acc: float, rows: list[Row],
                central_acc: float) -> None:
    def cycle(values):
        return "/".join(str(values[i % len(values)]) for i in range(args.clients))

    print(f"MiniLM-L6 + LoRA (query, value) + head; Rotten Tomatoes: {args.clients} clients with "
          f"{'/'.join(map(str, sizes))} reviews, ranks {cycle(rd.RANKS)}, alpha {cycle(rd.ALPHAS)}; "
          f"{args.epochs} local epochs per round; {args.test} held-out; untrained base acc {base_acc:.3f}")
    print(f"{'strategy':<11} {'round':>5} {'global acc':>10} {'exact acc':>9} {'logit err':>9} {'aggregate':>9}"
          "  client acc")
    for row in rows:
        print(f"{row.strategy:<11} {row.round:>5} {row.global_acc:>10.3f} {row.exact_acc:>9.3f} "
              f"{row.logit_err:>9.2e} {row.aggregate_s:>8.3f}s  {' '.join(f'{a:.3f}' for a in row.client_acc)}")
    print(f"centralised: one rank-8 LoRA on all {sum(sizes)} reviews pooled, {args.epochs * args.rounds} epochs: "
          f"acc {central_acc:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--examples", type=int, default=400, help="mean training examples per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--test", type=int, default=500, help="held-out reviews")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sizes = client_sizes(args.clients, args.examples)
    base = rd.base_model(seed=args.seed)
    split = rd.split(sizes, args.test, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="chorus-real-") as tmp, embedded_sdk(Path(tmp)) as sdk:
        workdir = Path(tmp)
        first_round = train_round(base, split, workdir / "r1", seed=args.seed * 100 + 1, epochs=args.epochs)
        rows = [row for strategy in STRATEGIES
                for row in run_strategy(sdk, strategy, base, split, sizes, first_round, args, workdir)]
        central = rd.train_client(base, split.pooled, workdir / "central", rank=8, alpha=16, seed=args.seed,
                                  epochs=args.epochs * args.rounds)
        central_acc = rd.accuracy(central.model, split.test)
    print_table(args, sizes, rd.accuracy(base, split.test), rows, central_acc)
    print(f"({time.perf_counter() - started:.0f}s, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
