"""What secure aggregation costs: each client's share and masking work, the aggregator's unmask.

    python benchmarks/secagg.py                         # llama-3.2-3b FFA-LoRA r=16 B factors, N=10, 3 dropped
    python benchmarks/secagg.py --quick                 # one layer, for a smoke run
    python benchmarks/secagg.py --clients 20 --neighbours 8 --dropped 2
    python benchmarks/secagg.py --shards 8              # also the unmask split as the workers shard it

The input is the trained factor of FFA-LoRA: every lora_B (d_out x r) of the 7 projections of
every layer, flattened into one vector (llama-3.2-3b: hidden 3072, intermediate 8192, kv dim
1024, 28 layers -> 28 * 16 * (3072+1024+1024+3072+8192+8192+3072) = 12,386,304 float32, 49.5 MB).
Each client's input is seeded Gaussian (std 1e-3, pre-scaled by weight 1/N). The protocol runs
in this one process, every party in turn (numpy and ChaCha20 are single-threaded: one core);
``--pin`` puts it on one CPU. Two scenarios per repeat:

  before-masked  the dropped clients fall silent after sharing keys: the aggregator rebuilds
                 their mask keys and removes every pairwise mask they shared with survivors
  after-masked   the dropped clients fall silent after sending masked inputs: their inputs are
                 summed and the aggregator rebuilds their self-mask seeds from the neighbours

Columns (medians over repeats; per-client columns are medians over clients too):

  keys s      advertise + share_keys: two X25519 pairs, Shamir shares, one sealed bundle per neighbour
  mask s      masked_input: open the neighbours' bundles, encode, add 1 + K masks (ChaCha20 keystream)
  client s    keys + mask + unmask response: a client's whole work in a round (target <= 2 s)
  unmask s    the aggregator's finish(): reconstructions, self and dropped-pair masks removed, decode
  server s    every aggregator step of the round (checks, routing, summing, unmask)
  rel err     ||sum - float64 oracle|| / ||oracle|| over the inputs summed (target <= 1e-5)
  up MB       what one client uploads: masked input + sealed shares + keys
  shard s     with --shards S: the slowest of S equal slices, each unmasked as a shard task does it (the
              seeds reconstructed again, then its slice of every survivor's masked input); checked equal
              to the whole unmask
  shards s    the S slices' total (one worker running them all)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chorus_mq.names import SecAggPhase
from chorus_mq.secagg.client import SecAggClient
from chorus_mq.secagg.params import SecAggParams
from chorus_mq.secagg.server import SecAggServer, unmask_slice

#: preset -> (layers, rank, [d_out of each adapted projection]); lora_B is d_out x r
SHAPES = {
    "llama-3.2-3b": (28, 16, [3072, 1024, 1024, 3072, 8192, 8192, 3072]),
    "llama-3.2-3b-layer": (1, 16, [3072, 1024, 1024, 3072, 8192, 8192, 3072]),
}


def element_count(shape: str) -> int:
    layers, rank, outs = SHAPES[shape]
    return layers * rank * sum(outs)


def client_input(i: int, length: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    return (rng.standard_normal(length, dtype=np.float32) * np.float32(1e-3 / n)).astype(np.float32)


def one_round(params: SecAggParams, dropped: list[str], phase: str, shards: int = 1) -> dict[str, float]:
    n, length = len(params.cohort), params.length
    clients = {c: SecAggClient(params, c) for c in params.cohort}
    server = SecAggServer(params)
    keys_s: dict[str, float] = {}
    mask_s: dict[str, float] = {}
    unmask_s: dict[str, float] = {}
    server_s = 0.0
    up_bytes = 0

    def timed(fn, *a):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = fn(*a)
        return out, time.perf_counter() - t

    adverts = {}
    for c in params.cohort:
        adverts[c], keys_s[c] = timed(clients[c].advertise)
    for c in params.cohort:
        _, s = timed(server.receive_advert, adverts[c])
        server_s += s
    routed, s = timed(server.close_advertise)
    server_s += s
    for c, theirs in routed.items():
        bundle, s = timed(clients[c].share_keys, theirs)
        keys_s[c] += s
        up_bytes = max(up_bytes, 64 + 32 + sum(len(b) for b in bundle.sealed.values()))
        _, s = timed(server.receive_shares, bundle)
        server_s += s
    inbox, s = timed(server.close_share)
    server_s += s
    oracle = np.zeros(length, dtype=np.float64)
    summed = set(params.cohort) - (set(dropped) if phase == "before-masked" else set())
    for c, sealed in inbox.items():
        if phase == "before-masked" and c in dropped:
            continue
        x = client_input(params.cohort.index(c), length, n)
        if c in summed:
            oracle += x
        msg, mask_s[c] = timed(clients[c].masked_input, sealed, x)
        del x
        _, s = timed(server.receive_masked, msg)
        server_s += s
    request, s = timed(server.close_masked)
    server_s += s
    for c in sorted(request.survivors):
        if phase == "after-masked" and c in dropped:
            continue
        resp, unmask_s[c] = timed(clients[c].unmask, request)
        _, s = timed(server.receive_unmask, resp)
        server_s += s
    result, finish_s = timed(server.finish)
    server_s += finish_s
    assert set(result.summed) == summed, (result.summed, summed)
    shard_s = []
    if shards > 1:
        bounds = [length * i // shards for i in range(shards + 1)]
        survivors = sorted(server.survivors)
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            t = time.perf_counter()
            server.phase = SecAggPhase.UNMASK  # every shard reconstructs the seeds again, as the shard tasks do
            seeds = server.unmask_seeds()
            parts.append(unmask_slice([server.masked[w].masked[lo:hi] for w in survivors], seeds, lo))
            shard_s.append(time.perf_counter() - t)
        assert np.array_equal(np.concatenate(parts), result.encoded)
    err = float(np.linalg.norm(result.total - oracle) / np.linalg.norm(oracle))
    working = [c for c in mask_s if c in unmask_s]
    return {
        "keys": statistics.median(keys_s[c] for c in working),
        "mask": statistics.median(mask_s[c] for c in working),
        "client": statistics.median(keys_s[c] + mask_s[c] + unmask_s[c] for c in working),
        "client_max": max(keys_s[c] + mask_s[c] + unmask_s[c] for c in working),
        "unmask": finish_s,
        "server": server_s,
        "err": err,
        "up_mb": (8 * length + up_bytes) / 1e6,
        "shard": max(shard_s, default=0.0),
        "shards": sum(shard_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="llama-3.2-3b")
    ap.add_argument("--quick", action="store_true", help="one layer, one repeat")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--neighbours", type=int, default=0, help="K (0: the default for N)")
    ap.add_argument("--threshold", type=int, default=0, help="T (0: floor(K/2) + 1)")
    ap.add_argument("--dropped", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="run on one CPU (os.sched_setaffinity)")
    ap.add_argument("--shards", type=int, default=1, help="also time the unmask split in this many shards")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.repeats = "llama-3.2-3b-layer", 1
    if args.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    length = element_count(args.shapes)
    cohort = tuple(f"client-{i:03d}" for i in range(args.clients))
    params = SecAggParams(
        federation="bench",
        round=1,
        cohort=cohort,
        length=length,
        graph_seed=b"benchmark-graph-seed",
        neighbour_count=args.neighbours,
        threshold=args.threshold,
    )
    dropped = list(cohort[1 : 1 + args.dropped])
    print(
        f"{args.shapes}: {length:,} elements ({4 * length / 1e6:.1f} MB fp32) per client, N={args.clients}, "
        f"K={params.neighbour_count}, T={params.threshold}, {args.dropped} dropped, {args.repeats} repeats, "
        f"cpus {len(os.sched_getaffinity(0))}"
    )
    header = f"{'scenario':<14} {'keys s':>7} {'mask s':>7} {'client s':>9} {'max':>6} {'unmask s':>9} {'server s':>9}"
    sharded = args.shards > 1
    print(header + f" {'rel err':>9} {'up MB':>7}" + (f" {'shard s':>8} {'shards s':>9}" if sharded else ""))
    for phase in ("before-masked", "after-masked"):
        runs = [one_round(params, dropped, phase, args.shards) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{phase:<14} {med['keys']:7.3f} {med['mask']:7.3f} {med['client']:9.3f} {med['client_max']:6.2f} "
            f"{med['unmask']:9.3f} {med['server']:9.3f} {max(r['err'] for r in runs):9.1e} {med['up_mb']:7.1f}"
            + (f" {med['shard']:8.3f} {med['shards']:9.3f}" if sharded else "")
        )


if __name__ == "__main__":
    main()
