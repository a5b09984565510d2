"""Time, memory and exactness of aggregating a whole model, module by module.

Run: python benchmarks/aggregate.py [--quick] [--shapes small,medium,llama-3.2-3b,llama-3.2-3b-layer,medium-n100]
                                    [--strategies fedavg,fedex-lora,svd,stack,fedex-lora-raw] [--baseline-src DIR]
                                    [--chain] [--workers N] [--absent-weight W]

"fedex-lora-raw" is fedex-lora without the canonical factors (chorus_mq.aggregation.canonical):
what the rule costs, e.g. ``--shapes llama-3.2-3b-layer --strategies fedex-lora,fedex-lora-raw
--no-baseline`` (one llama-3.2-3b layer: 3072x3072 ... 3072x8192, r = 16, N = 10).

Each (shape, strategy) runs in a fresh subprocess, so peak RSS (ru_maxrss, read before any
exactness check) is that case's own. Ours runs as the worker runs a round: modules side by
side through chorus_mq.aggregation.map_ordered (--workers, default the cores), one torch
thread each, with the worker's allocator tuning (chorus_mq.workers.memory.retain_freed_memory); the
baseline runs module after module on 2 torch threads (--threads). Inputs: for every
distinct module shape, one pool of N seeded Gaussian clients (A ~ N(0, 1/d_in),
B ~ N(0, 1e-4), rank r, lora_alpha = 2r, weights = random dataset sizes) is generated
*before* the timed region and reused by every layer; outputs are dropped after each
module. Time = median of 3 whole-model passes after a warm-up; "min s" is the fastest pass (less
disturbed by other processes).
Exactness = max over the distinct shapes of ||s B A + R - M||_F / ||M||_F against a
float64 dense oracle M = sum_i w_i s_i B_i A_i; "adapter err" leaves R out. Residuals are
stored at their exact rank ("res. rank": (N-1) r for fedex-lora, N r - r for svd; N r with
--absent-weight, whose clients count as zero updates, as a module missing from some deltas).
With --chain, "chain:<strategy>" rows time chaining a second round's residuals (other
seeded clients) onto the first's, as the worker does every round; their exactness is
against the float64 sum of the two residuals.

The dense-baseline rows run the old HTTP tool's approach (dense M per module, a complete
SVD of it with torch.linalg.svd, dense residual): its own code when --baseline-src points at an
unpacked chorus-fl 0.1.0 wheel (pip download --no-deps chorus-fl), else a faithful
re-implementation below. It ignores lora_alpha/r, which its exactness column shows.
On llama-3.2-3b it runs one layer and multiplies by 28 (labelled extrapolated).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import chorus_mq  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chorus_mq.aggregation import (
    ClientUpdate,
    aggregate_module,
    chain_residuals,
    map_ordered,
)
from chorus_mq.aggregation.parallel import default_workers
from chorus_mq.names import Strategy
from chorus_mq.strategy import strategy_spec
from chorus_mq.workers.memory import retain_freed_memory

LLAMA_3B = {
    "q_proj": (3072, 3072),
    "k_proj": (1024, 3072),
    "v_proj": (1024, 3072),
    "o_proj": (3072, 3072),
    "gate_proj": (8192, 3072),
    "up_proj": (8192, 3072),
    "down_proj": (3072, 8192),
}
SHAPES = {
    # name: (layers, {module: (d_out, d_in)}, rank, clients)
    "small": (4, {"q_proj": (768, 768), "v_proj": (768, 768)}, 8, 10),
    "medium": (8, dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), (2048, 2048)), 16, 10),
    "llama-3.2-3b": (28, LLAMA_3B, 16, 10),
    "medium-n100": (8, dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), (2048, 2048)), 16, 100),
    "llama-3.2-3b-layer": (1, LLAMA_3B, 16, 10),
}
#: fedex-lora with the clients' factors averaged as sent (no canonical form): the rule's cost
RAW = "fedex-lora-raw"
BASELINE = "dense-baseline"
CHAIN = "chain:"
THREADS = 2
REPS = 3


def client_pool(shape: str, seed: int = 0) -> dict[tuple[int, int], list[ClientUpdate]]:
    """N seeded clients per distinct module shape, shared by all layers."""
    _, modules, rank, n = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(100, 1000, (n,), generator=gen).tolist()
    pool = {}
    for d_out, d_in in sorted(set(modules.values())):
        pool[(d_out, d_in)] = [
            ClientUpdate(
                A=torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in),
                B=torch.randn(d_out, rank, generator=gen) * 1e-2,
                scaling=2.0,
                weight=float(size),
            )
            for size in sizes
        ]
    return pool


def oracle_errors(
    updates: list[ClientUpdate], scaling: float, B, A, residual_dense, *, absent: float = 0.0
) -> tuple[float, float]:
    weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    weights /= weights.sum() + absent
    m = torch.zeros(updates[0].B.shape[0], updates[0].A.shape[1], dtype=torch.float64)
    for u, w in zip(updates, weights.tolist(), strict=False):
        m += (w * u.scaling) * (u.B.double() @ u.A.double())
    adapter = scaling * (B.double() @ A.double())
    total = adapter if residual_dense is None else adapter + residual_dense.double()
    norm = m.norm()
    return float((total - m).norm() / norm), float((adapter - m).norm() / norm)


def _timed_passes(one, jobs: list, reps: int, workers: int) -> tuple[list[float], int]:
    """``reps`` timed passes of ``one`` over ``jobs``, as the worker runs a round: modules side by
    side, one torch thread each. Returns the pass times and the last pass's summed result."""
    sum(map_ordered(one, jobs[:workers], workers=workers))  # warm-up: MKL/LAPACK initialise lazily
    times, total = [], 0
    for _ in range(reps):
        start = time.perf_counter()
        total = sum(map_ordered(one, jobs, workers=workers))
        times.append(time.perf_counter() - start)
    return times, total


def run_ours(shape: str, strategy: str, reps: int, workers: int, absent: float = 0.0) -> dict:
    layers, modules, _, _ = SHAPES[shape]
    pool = client_pool(shape)
    aggregate = _raw_fedex if strategy == RAW else aggregate_module
    spec = None if strategy == RAW else strategy_spec(strategy)
    if spec is not None and spec.frozen_shared:  # ffa-lora, rolora: every client holds the round's frozen A
        pool = {dims: [dataclasses.replace(u, A=ups[0].A) for u in ups] for dims, ups in pool.items()}
        aggregate = functools.partial(aggregate_module, trains=spec.trainable(1))
    jobs = [pool[dims] for _layer in range(layers) for dims in modules.values()]

    def one(updates: list[ClientUpdate]) -> int:
        res = aggregate(updates, strategy, absent_weight=absent)
        return res.residual.nbytes if res.residual is not None else 0  # outputs dropped, as once written

    times, residual_bytes = _timed_passes(one, jobs, reps, workers)
    peak = _peak_rss_mb()
    exact, adapter, ranks = 0.0, 0.0, set()
    for updates in pool.values():
        res = aggregate(updates, strategy, absent_weight=absent)
        dense = None if res.residual is None else res.residual.to_dense()
        e, a = oracle_errors(updates, res.scaling, res.B, res.A, dense, absent=absent)
        exact, adapter = max(exact, e), max(adapter, a)
        ranks.add(
            "-" if res.residual is None else "dense" if res.residual.dense is not None else str(res.residual.rank)
        )
    return {
        "times": times,
        "peak_mb": peak,
        "residual_mb": residual_bytes / 2**20,
        "exact": exact,
        "adapter": adapter,
        "ranks": "/".join(sorted(ranks)),
    }


def _raw_fedex(updates: list[ClientUpdate], _strategy: str, *, absent_weight: float = 0.0):
    """fedex-lora on the factors as sent: the engine's steps without its canonical form (benchmark only)."""
    from chorus_mq.aggregation import strategies

    p = strategies.prepare(updates, Strategy.FEDEX_LORA, absent_weight=absent_weight)
    return strategies._conform(strategies._fedex(p), p.layout)  # private steps: what the rule costs


def run_chain(shape: str, strategy: str, reps: int, workers: int) -> dict:
    """Chaining a second round's residuals onto the first's (the worker's per-round re-compression)."""
    layers, modules, _, _ = SHAPES[shape]
    rounds = [
        {dims: aggregate_module(updates, strategy).residual for dims, updates in client_pool(shape, seed).items()}
        for seed in (0, 1)
    ]
    jobs = [dims for _layer in range(layers) for dims in modules.values()]

    def one(dims: tuple[int, int]) -> int:
        chained = chain_residuals(rounds[0][dims], rounds[1][dims])
        return chained.nbytes if chained is not None else 0

    times, chained_bytes = _timed_passes(one, jobs, reps, workers)
    peak = _peak_rss_mb()
    exact = 0.0
    for dims in rounds[0]:
        expected = rounds[0][dims].to_dense().double() + rounds[1][dims].to_dense().double()
        got = chain_residuals(rounds[0][dims], rounds[1][dims]).to_dense().double()
        exact = max(exact, float((got - expected).norm() / expected.norm()))
    return {"times": times, "peak_mb": peak, "residual_mb": chained_bytes / 2**20, "exact": exact, "adapter": None}


def run_baseline(shape: str, reps: int, baseline_src: str | None) -> dict:
    """The old tool on the whole shape, or on one layer x 28 for llama-3.2-3b."""
    layers, modules, _, _ = SHAPES[shape]
    run_layers = 1 if shape == "llama-3.2-3b" else layers
    pool = client_pool(shape)
    fedex, origin = _baseline_impl(baseline_src)
    n = len(next(iter(pool.values())))
    deltas = [{} for _ in range(n)]  # the tool takes one dict of PEFT tensors per client
    for layer in range(run_layers):
        for name, dims in modules.items():
            for i, u in enumerate(pool[dims]):
                deltas[i][f"layers.{layer}.{name}.lora_A.weight"] = u.A
                deltas[i][f"layers.{layer}.{name}.lora_B.weight"] = u.B
    weights = [u.weight for u in next(iter(pool.values()))]
    torch.linalg.svd(torch.randn(64, 64))  # warm-up, as for ours
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out, residuals = fedex(deltas, weights)
        times.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    exact, adapter = 0.0, 0.0
    for name, dims in modules.items():
        key = f"layers.0.{name}"
        # the tool keeps each client's adapter_config, so its adapter loads with that scaling
        b_new, a_new = out[f"{key}.lora_B.weight"], out[f"{key}.lora_A.weight"]
        e, a = oracle_errors(pool[dims], pool[dims][0].scaling, b_new, a_new, residuals[key])
        exact, adapter = max(exact, e), max(adapter, a)
    factor = layers / run_layers
    residual_mb = sum(r.numel() * r.element_size() for r in residuals.values()) / 2**20
    return {
        "times": [t * factor for t in times],
        "peak_mb": peak,
        "residual_mb": residual_mb * factor,
        "exact": exact,
        "adapter": adapter,
        "origin": origin,
        "extrapolated": factor != 1,
    }


def _baseline_impl(baseline_src: str | None):
    if baseline_src:
        root = Path(baseline_src)
        # Load only the two modules needed; the package __init__ pulls in the web server.
        files = (("chorus.patterns", "chorus/patterns.py"), ("chorus_fl_aggregation", "chorus/server/aggregation.py"))
        for mod, rel in files:
            spec = importlib.util.spec_from_file_location(mod, root / rel)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod] = module
            spec.loader.exec_module(module)

        def run(deltas, weights):
            strategy = sys.modules["chorus_fl_aggregation"].FedExLoRA()
            out = strategy.aggregate(deltas, weights)
            return out, strategy.get_residuals()

        return run, "chorus-fl 0.1.0 FedExLoRA (its own code)"
    return _dense_fedex, "re-implementation of chorus-fl 0.1.0 FedExLoRA"


def _dense_fedex(deltas, weights):
    """What the old tool does per module: dense sum of w_i B_i A_i (no alpha/r), full SVD."""
    total = sum(weights)
    weights = [w / total for w in weights]
    out, residuals = {}, {}
    for key in deltas[0]:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        a_key, b_key = key, f"{name}.lora_B.weight"
        target = torch.zeros(deltas[0][b_key].shape[0], deltas[0][a_key].shape[1])
        for d, w in zip(deltas, weights, strict=False):
            target += w * (d[b_key].float() @ d[a_key].float())
        rank = deltas[0][a_key].shape[0]
        u, s, vt = torch.linalg.svd(target, full_matrices=False)
        out[b_key] = (u[:, :rank] * s[:rank]).contiguous()
        out[a_key] = vt[:rank].contiguous()
        residuals[name] = target - out[b_key] @ out[a_key]
    return out, residuals


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(case: dict) -> None:
    torch.set_num_threads(case.get("threads", THREADS))
    retain_freed_memory()  # the allocator tuning the worker applies before it aggregates
    if case["strategy"] == BASELINE:
        result = run_baseline(case["shape"], case["reps"], case.get("baseline_src"))
    elif case["strategy"].startswith(CHAIN):
        result = run_chain(
            case["shape"], case["strategy"][len(CHAIN) :], case["reps"], case.get("workers") or default_workers()
        )
    else:
        result = run_ours(
            case["shape"], case["strategy"], case["reps"], case.get("workers") or default_workers(), case["absent"]
        )
    print(json.dumps(result))


def run_case(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and medium only, 1 pass each")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--strategies", default=",".join(Strategy.values()))
    parser.add_argument("--baseline-src", default=None, help="unpacked chorus-fl wheel to run as the baseline")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--absent-weight",
        type=float,
        default=0.0,
        help="weight of clients that did not send the modules (zero updates), relative to the N clients' total",
    )
    parser.add_argument(
        "--chain",
        action="store_true",
        help="also time chaining a second round's residuals onto the first's, per strategy",
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per case (the dense baseline)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="modules aggregated side by side, one torch thread each (default: the cores)",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(json.loads(args.case))
        return
    shapes = (args.shapes or ("small,medium" if args.quick else ",".join(SHAPES))).split(",")
    reps = 1 if args.quick else REPS
    cases = [(s, st) for s in shapes for st in args.strategies.split(",")]
    if args.chain:
        cases += [(s, CHAIN + st) for s in shapes for st in args.strategies.split(",") if st in ("fedex-lora", "svd")]
    if not args.no_baseline:
        cases += [(s, BASELINE) for s in shapes if s in ("small", "llama-3.2-3b")]
    print(
        f"torch {torch.__version__}; ours: {args.workers or default_workers()} modules side by side, 1 torch thread"
        f" each; baseline: {args.threads} torch threads; median of {reps}, fresh process per row;"
        f" load average {_load()} at start"
    )
    header = (
        f"{'shape':<14}{'strategy':<16}{'time s':>10}{'min s':>9}{'peak MB':>10}{'residual MB':>13}"
        f"{'exactness':>11}{'adapter err':>13}{'res. rank':>11}"
    )
    print(header)
    print("-" * len(header))
    medians, notes = {}, []
    for shape, strategy in cases:
        case = {
            "shape": shape,
            "strategy": strategy,
            "reps": reps,
            "baseline_src": args.baseline_src,
            "threads": args.threads,
            "workers": args.workers,
            "absent": args.absent_weight,
        }
        r = run_case(case)
        med = statistics.median(r["times"])
        medians[(shape, strategy)] = med
        mark = "*" if r.get("extrapolated") else ""
        print(
            f"{shape:<14}{strategy + mark:<16}{med:>10.3f}{min(r['times']):>9.3f}{r['peak_mb']:>10.0f}"
            f"{r['residual_mb']:>13.1f}"
            f"{r['exact']:>11.1e}"
            + (f"{r['adapter']:>13.3f}" if r["adapter"] is not None else f"{'-':>13}")
            + f"{r.get('ranks', '-'):>11}",
            flush=True,
        )
        if "origin" in r:
            notes.append(f"{shape} {strategy}: {r['origin']}")
    for shape in shapes:
        raw, canon = medians.get((shape, RAW)), medians.get((shape, "fedex-lora"))
        if raw and canon:
            notes.append(f"{shape}: fedex-lora with / without canonical factors = {canon / raw:.2f}x")
        base = medians.get((shape, BASELINE))
        for strategy in ("svd", "fedex-lora"):
            ours = medians.get((shape, strategy))
            if base and ours:
                notes.append(f"{shape}: dense-baseline / {strategy} time = {base / ours:.0f}x")
    if any(s == "llama-3.2-3b" for s, _ in medians):
        notes.append("* extrapolated: one layer measured, time and residual x28; peak is the one-layer peak")
    notes.append(f"load average {_load()} at end (other processes share these cores)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
