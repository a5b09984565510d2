"""Rounds through the real worker path: what users get, round after round.

    python benchmarks/rounds.py                                   # llama-3.2-3b shapes, N=10, r=16, 20 rounds
    python benchmarks/rounds.py --shapes small --rounds 5         # a quick run
    python benchmarks/rounds.py --workers 1,2 --rounds 3          # the shard speed-up of a second worker
    python benchmarks/rounds.py --mode buffered                   # FedBuff flushes: a version per N deltas
    python benchmarks/rounds.py --strategy ffa-lora --secure-aggregation --drop 3   # SecAgg+, 3 silent at unmask
    python benchmarks/rounds.py --shapes llama-3.1-70b --layers 2 --clients 100 --strategy ffa-lora --workers 1,2
                                                                  # 2 of 80 layers, extrapolated to all 80

A private redis-server, a file:// store, and real ``chorus-mq worker`` processes (one ingest
worker, W aggregate workers, each ``--concurrency 1``); N registered clients upload fresh signed
deltas every round through the SDK (the inbox, the pump, ingest), the last upload fires the
quorum, and the round runs as the fleet runs it (plan, shards, commit). Per round it prints:

  quorum→done  seconds from the quorum firing to round_complete (the round hash's timestamps)
  fetch/math/write/commit  the manifest's phase seconds (summed over shards)
  tasks        the shard tasks' wall time summed (the manifest's timings.shards)
  worker RSS   peak resident memory of the aggregate worker processes during the round
  written      bytes the round wrote (the adapter and this round's residual)
  pull         a continuing client's pull of this round (a separate process): MB downloaded,
               seconds, peak RSS, and the size of its folded correction on disk
  disk         everything the continuing client's pulled directory takes on disk (each file once):
               the correction stays within the adapted modules' dense fp32 size (the summary's
               bound), plus the round's own adapter and residual
  compact      seconds of the compaction (every --checkpoint-every rounds), off the critical path
  verdict      seconds an upload to another federation waits for its verdict while the round aggregates

With ``--mode buffered`` the federation is a buffered one (``--buffer N``, the clients): each round is a
flush, round 0 publishes an initial adapter, and every other client trained from the version before the
latest (staleness 1, poly:0.5), so each flush's residual carries two base versions.

With ``--secure-aggregation`` (ffa-lora, rolora) every client runs its secure round in a thread of its own
(advertise → share → masked input → unmask) through ``ChorusClient.upload``, ``--drop D`` of them falling
silent at the unmask phase (after their masked inputs): their inputs are summed all the same. Per round it
adds the secure phases' wall time (the first client starting → the round complete), the masked-input quorum
→ complete (the unmask, then the plain round on the sum), and each client's own CPU seconds (its thread's
time: encoding, masking, key agreement, sealing shares and writing its masked input; torch at 1 thread).

Medians and the ratio of the last round to the first are printed last. With ``--workers 1,2``
every worker count runs its own federation, each aggregate worker ``--concurrency 1``,
``CHORUS_AGGREGATION_WORKERS=1`` and pinned to a core of its own (``--no-pin`` leaves them free),
and the table compares their median round times; a model measured on 1 worker (the serial part: the round
beyond its shard tasks; the shard work: those tasks; the shard count; the store's measured write bandwidth)
predicts the other worker counts, prints its error against them, and says where more workers stop helping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chorus_mq.adapters import LoraSpec, ModelDecl
from chorus_mq.adapters.delta import LocalAdapter, write_delta
from chorus_mq.client import ChorusClient
from chorus_mq.names import Strategy
from chorus_mq.settings import Settings
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import strategy_spec
from tests.services import RedisServer

ROOT = Path(__file__).resolve().parents[1]

#: preset -> (layers, [(module, d_out, d_in)])
SHAPES = {
    "llama-3.2-3b": (
        28,
        [
            ("self_attn.q_proj", 3072, 3072),
            ("self_attn.k_proj", 1024, 3072),
            ("self_attn.v_proj", 1024, 3072),
            ("self_attn.o_proj", 3072, 3072),
            ("mlp.gate_proj", 8192, 3072),
            ("mlp.up_proj", 8192, 3072),
            ("mlp.down_proj", 3072, 8192),
        ],
    ),
    # 80 layers, hidden 8192, 64 query heads and 8 key/value heads of 128, MLP 28672
    "llama-3.1-70b": (
        80,
        [
            ("self_attn.q_proj", 8192, 8192),
            ("self_attn.k_proj", 1024, 8192),
            ("self_attn.v_proj", 1024, 8192),
            ("self_attn.o_proj", 8192, 8192),
            ("mlp.gate_proj", 28672, 8192),
            ("mlp.up_proj", 28672, 8192),
            ("mlp.down_proj", 8192, 28672),
        ],
    ),
    "medium": (
        8,
        [
            ("self_attn.q_proj", 2048, 2048),
            ("self_attn.v_proj", 2048, 2048),
            ("mlp.up_proj", 5632, 2048),
            ("mlp.down_proj", 2048, 5632),
        ],
    ),
    "small": (4, [("self_attn.q_proj", 256, 256), ("self_attn.v_proj", 256, 256)]),
}


def modules(preset: str, layers: int | None = None) -> dict[str, tuple[int, int]]:
    """The preset's adapted modules, of its first ``layers`` layers only when given (a few layers of a model
    too large for this machine; ``--workers`` then extrapolates to all of them)."""
    total, per_layer = SHAPES[preset]
    layers = total if layers is None else min(layers, total)
    return {
        f"base_model.model.model.layers.{i}.{name}": (d_out, d_in)
        for i in range(layers)
        for name, d_out, d_in in per_layer
    }


@dataclass
class Row:
    round: int
    seconds: float
    phases: dict[str, float]
    rss_mb: float
    written_mb: float
    pull_mb: float = 0.0
    pull_s: float = 0.0
    pull_rss_mb: float = 0.0
    correction_mb: float = 0.0
    disk_mb: float = 0.0
    verdict_s: float | None = None
    compact_s: float | None = None
    shards: int = 0
    #: --secure-aggregation: first client starting → round complete; masked-input quorum → complete; client CPU
    secure_wall_s: float = 0.0
    unmask_s: float = 0.0
    client_cpu_s: list[float] = field(default_factory=list)


@dataclass
class Deployment:
    workdir: Path
    redis: RedisServer
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    aggregators: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self,
        role: str,
        *,
        concurrency: int | None = None,
        extra_env: dict[str, str] | None = None,
        cpu: int | None = None,
    ) -> subprocess.Popen:
        """``chorus-mq worker --role ROLE`` (``chorus-mq beat`` for ``beat``; a worker: default concurrency), pinned to
        core ``cpu`` when given (its pool children and threads inherit the affinity)."""
        log = open(self.workdir / f"{role}-{len(self.procs)}.log", "w")  # noqa: SIM115 - lives with the process
        extra = ["-c", str(concurrency)] if concurrency else []
        command = (
            ["beat", "-l", "WARNING"]  # the sweep: it opens secure rounds' phases and closes them at deadlines
            if role == "beat"
            else ["worker", "--role", role, *extra, "-l", "WARNING", "--hostname", f"{role}{len(self.procs)}@%h"]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "chorus_mq.cli", *command],
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        if cpu is not None:  # at once, before the worker starts threads or forks its pool: they inherit it
            os.sched_setaffinity(proc.pid, {cpu})
        self.procs.append(proc)
        if role == "aggregate":
            self.aggregators.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        self.procs.clear()
        self.aggregators.clear()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the worker's pool children)."""
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += _tree(int(child))
    return out


def reset_peaks(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        for pid in _tree(proc.pid):
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (peak RSS)
            except OSError:
                pass


def peak_rss_mb(procs: list[subprocess.Popen]) -> float:
    """The largest peak RSS of any one process of the workers (each pool child runs one task at a time)."""
    peak = 0
    for proc in procs:
        for pid in _tree(proc.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
    return peak / 1024


def make_delta(
    path: Path,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    seed: int,
    *,
    keep: dict[str, torch.Tensor] | None = None,
    zero_b: bool = False,
    frame: bool = False,
    only_r: bool = False,
) -> Path:
    """Random factors; ``keep``: tensors used as they are (a round's frozen shared factor); ``zero_b``: B = 0
    (a linear strategy's round 0); ``frame``: fed-sb's seeded orthonormal frame; ``only_r``: a fed-sb upload
    (a random r x r ``lora_R`` per module)."""
    from chorus_mq.aggregation.sandwich import frame as sb_frame

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in shapes.items():
        if only_r:
            tensors[f"{name}.lora_R.weight"] = torch.randn(rank, rank, generator=gen) / rank
            continue
        if frame:
            tensors[f"{name}.lora_B.weight"], tensors[f"{name}.lora_A.weight"] = sb_frame(
                d_out, d_in, rank, seed=seed, module=name
            )
            continue
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
        tensors[f"{name}.lora_B.weight"] = (
            torch.zeros(d_out, rank) if zero_b else torch.randn(d_out, rank, generator=gen) / rank**0.5
        )
    tensors.update(keep or {})
    targets = tuple(sorted({n.rsplit(".", 1)[1] for n in shapes}))
    spec = LoraSpec(r=rank, lora_alpha=2.0 * rank, target_modules=targets, task_type="CAUSAL_LM")
    write_delta(LocalAdapter(spec, tensors), path)
    return path


_PULL = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from chorus_mq.client import ChorusClient
from chorus_mq.settings import Settings
sdk = ChorusClient(Settings(redis_url={url!r}, store={store!r}))
down = 0  # the bytes the store hands out: what the pull really fetched
get_range, stream = sdk.store.get_range, sdk.store.stream
def counted_range(key, start, end):
    global down
    data = get_range(key, start, end)
    down += len(data)
    return data
def counted_stream(key, start=0, end=None):
    global down
    for chunk in stream(key, start, end):
        down += len(chunk)
        yield chunk
sdk.store.get_range, sdk.store.stream = counted_range, counted_stream
t = time.perf_counter()
m = sdk.pull({fed!r}, {out!r}, {round})
took = time.perf_counter() - t
print(json.dumps({{"seconds": took, "bytes": down, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def pull_in_subprocess(dep: Deployment, federation: str, out: Path, r: int) -> dict[str, float]:
    code = _PULL.format(
        root=str(ROOT),
        url=dep.env["CHORUS_REDIS_URL"],
        store=dep.env["CHORUS_STORE"],
        fed=federation,
        out=str(out),
        round=r,
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dep.env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


class Probe:
    """A small federation beside the benchmark's: how long an upload's verdict takes while a round aggregates."""

    def __init__(self, sdk: ChorusClient, workdir: Path):
        shapes = modules("small")
        decl = ModelDecl(modules=shapes, extras={}, task_type="CAUSAL_LM")
        sdk.create_federation(FederationConfig(name="probe", base_model="small", quorum=10_000), model=decl)
        # one client per benchmark round: the probe's own round never fills, and nobody uploads twice to it
        self.clients = [
            ChorusClient(sdk.settings, secret=sdk.add_client("probe", f"p{r}").secret) for r in range(1, 101)
        ]
        self.shapes, self.workdir = shapes, workdir

    def upload(self, r: int) -> float:
        path = make_delta(self.workdir / "probe.safetensors", self.shapes, 4, seed=r)
        started = time.perf_counter()
        self.clients[(r - 1) % len(self.clients)].upload(
            "probe", path, f"p{(r - 1) % len(self.clients) + 1}", timeout=600
        )
        return time.perf_counter() - started


class _Silent(Exception):
    """A client falling silent at a phase (--drop)."""


class SecureRound:
    """Every client's secure round ``r`` in a thread of its own; the first ``drop`` fall silent at the unmask."""

    def __init__(self, clients: list[ChorusClient], name: str, r: int, paths: list[Path], *, drop: int):
        self.started = time.time()
        self.cpu_s: list[float] = []
        self.failures: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(sdk, name, r, i, path, i < drop))
            for i, (sdk, path) in enumerate(zip(clients, paths, strict=True))
        ]
        for t in self._threads:
            t.start()

    def _run(self, sdk: ChorusClient, name: str, r: int, i: int, path: Path, silent: bool) -> None:
        def on_phase(_r: int, phase: str) -> None:
            if silent and phase == "unmask":
                raise _Silent(phase)

        cpu = time.thread_time()
        try:
            sdk.upload(name, path, f"c{i}", dataset_size=100.0 + i, round_=r, timeout=1800, on_phase=on_phase)
        except _Silent:
            pass
        except BaseException as exc:
            self.failures.append(exc)
        self.cpu_s.append(time.thread_time() - cpu)

    def join(self) -> None:
        for t in self._threads:
            t.join()
        if self.failures:
            raise SystemExit(f"a secure client failed: {self.failures[0]!r}")


def _masked_quorum(sdk: ChorusClient, name: str, r: int) -> float:
    """When round ``r``'s unmask phase began (every masked input in, or the phase's deadline)."""
    for event in sdk.state.events(name).read():
        if event.type == "secagg_phase" and event.round == r and event.fields.get("phase") == "unmask":
            return event.ts
    raise SystemExit(f"round {r} has no unmask phase event")


def run_federation(
    dep: Deployment,
    sdk: ChorusClient,
    name: str,
    args: argparse.Namespace,
    shapes: dict,
    *,
    pull: bool,
    echo: bool,
    probe: Probe | None = None,
) -> list[Row]:
    buffered = args.mode == "buffered"
    config = FederationConfig(
        name=name,
        base_model=args.shapes,
        quorum=args.clients,
        strategy=Strategy(args.strategy),
        checkpoint_every=args.checkpoint_every,
        max_client_weight=1.0,
        **({"mode": "buffered", "relative_clip": 0.0, "max_staleness": 2} if buffered else {}),
        **(
            {"secure_aggregation": True, "secagg_phase_timeout": args.phase_timeout, "relative_clip": 0.0}
            if args.secure_aggregation
            else {}
        ),
    )
    spec = strategy_spec(args.strategy)
    initial = None
    deltas = dep.workdir / "deltas"
    deltas.mkdir(exist_ok=True)
    if spec.sandwich:  # fed-sb: round 0 publishes the seeded orthonormal frame (and R = 0)
        initial = make_delta(deltas / "initial.safetensors", shapes, args.rank, seed=0, frame=True)
    elif spec.frozen_shared:  # round 0 publishes the shared factors: A seeded, B = 0
        initial = make_delta(deltas / "initial.safetensors", shapes, args.rank, seed=0, zero_b=True)
    elif buffered:  # version 0, the first flush's base
        initial = make_delta(deltas / "initial.safetensors", shapes, args.rank, seed=0)
    decl = ModelDecl(modules=shapes, extras={}, task_type="CAUSAL_LM")
    sdk.create_federation(config, model=decl, initial_adapter=initial)
    published = load_file(str(initial)) if initial is not None else {}
    secrets = [sdk.add_client(name, f"c{i}").secret for i in range(args.clients)]
    clients = [ChorusClient(sdk.settings, secret=s) for s in secrets]
    pulled = dep.workdir / f"pulled-{name}"
    rows = []
    for r in range(1, args.rounds + 1):
        frozen = spec.frozen(r)
        keep = {k: t for k, t in published.items() if frozen is not None and k.endswith(f".{frozen}.weight")}
        paths = [
            make_delta(
                deltas / f"c{i}.safetensors", shapes, args.rank, seed=1000 * r + i, keep=keep, only_r=spec.sandwich
            )
            for i in range(args.clients)
        ]
        # buffered: every other client trained from the version before the latest (staleness 1)
        base = {i: (max(0, r - 1 - i % 2) if buffered else None) for i in range(args.clients)}
        secure: SecureRound | None = None
        if args.secure_aggregation:
            reset_peaks(dep.aggregators)  # every client stays up through the phases: one thread each
            secure = SecureRound(clients, name, r, paths, drop=args.drop)
            verdict = probe.upload(r) if probe else None
            secure.join()
        else:
            for i, path in enumerate(paths[:-1]):
                clients[i].upload(name, path, f"c{i}", dataset_size=100.0 + i, timeout=600, base_version=base[i])
            reset_peaks(dep.aggregators)
            last = args.clients - 1
            clients[-1].upload(
                name, paths[-1], f"c{last}", dataset_size=100.0 + args.clients, timeout=600, base_version=base[last]
            )
            verdict = probe.upload(r) if probe else None  # another federation's upload while this round aggregates
        sdk.wait_round(name, r, timeout=1800)
        info = sdk.state.round(name, r)
        if info.state != "complete":
            raise SystemExit(f"round {r} ended {info.state}: {info.reason}")
        manifest = json.loads(sdk.store.get_bytes(info.manifest))
        row = Row(
            round=r,
            seconds=(info.completed_at or 0) - (info.agg_started or 0),
            phases={k: manifest["timings"].get(k, 0.0) for k in ("fetch", "math", "write", "commit", "shards")},
            rss_mb=peak_rss_mb(dep.aggregators),
            written_mb=(manifest["adapter_bytes"] + manifest["residual_bytes"]) / 2**20,
            shards=len(manifest["shards"]),
            verdict_s=verdict,
        )
        if secure is not None:
            row.secure_wall_s = (info.completed_at or 0) - secure.started
            row.unmask_s = (info.completed_at or 0) - _masked_quorum(sdk, name, r)
            row.client_cpu_s = secure.cpu_s
        if pull:
            got = pull_in_subprocess(dep, name, pulled, r)
            row.pull_mb, row.pull_s, row.pull_rss_mb = got["bytes"] / 2**20, got["seconds"], got["rss_kb"] / 1024
            parts = [pulled / "cumulative_residual.safetensors", *(pulled / "increments").glob("*.safetensors")]
            row.correction_mb = sum(p.stat().st_size for p in parts) / 2**20
            row.disk_mb = directory_bytes(pulled) / 2**20
        if spec.frozen_shared:  # the next round's frozen factor is this round's published one
            if not pull:
                sdk.pull(name, pulled, r)
            published = load_file(str(pulled / "adapter_model.safetensors"))
        if args.checkpoint_every and r % args.checkpoint_every == 0:
            row.compact_s = _wait_snapshot(sdk, name, r)
        _forget_inputs(dep, name)
        rows.append(row)
        if echo:
            print(_format(row), flush=True)
    return rows


def _mb(value: float) -> str:
    """Megabytes as a whole number, or to 0.01 below 10 (a fed-sb round writes and pulls a fraction of one)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def directory_bytes(directory: Path) -> int:
    """The bytes of every file under ``directory``, each once (``residual.safetensors`` may link an increment)."""
    sizes = {p.stat().st_ino: p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    return sum(sizes.values())


def dense_bound_mb(shapes: dict[str, tuple[int, int]]) -> float:
    """The adapted modules as dense fp32 matrices: what a client's correction may take on disk at most."""
    return sum(4 * d_out * d_in for d_out, d_in in shapes.values()) / 2**20


def _wait_snapshot(sdk: ChorusClient, name: str, r: int, timeout: float = 1800) -> float | None:
    deadline = time.monotonic() + timeout
    for event in sdk.watch(name, from_start=True, timeout=timeout):
        if event.type == "snapshot_ready" and event.round == r:
            return float(event.fields.get("seconds", 0.0))
        if time.monotonic() > deadline:
            break
    return None


def _forget_inputs(dep: Deployment, name: str) -> None:
    """Free the disk a benchmark of many rounds would fill: the round's deltas are no longer needed."""
    store = Path(dep.env["CHORUS_STORE"].removeprefix("file://"))
    for sub in ("deltas", "accepted"):
        for path in (store / name / sub).rglob("*.safetensors"):
            path.chmod(0o644)
            path.unlink()


HEADER = (
    f"{'round':>5} {'quorum→done':>11} {'fetch':>6} {'math':>6} {'write':>6} {'commit':>6} {'tasks':>6} {'shards':>6} "
    f"{'worker RSS':>10} {'written':>8} {'pull MB':>8} {'pull s':>7} {'pull RSS':>8} {'correction':>10} "
    f"{'disk':>8} {'compact':>8} {'verdict':>8}"
)


def _format(row: Row) -> str:
    p = row.phases
    compact = f"{row.compact_s:7.2f}s" if row.compact_s is not None else f"{'-':>8}"
    verdict = f"{row.verdict_s:7.2f}s" if row.verdict_s is not None else f"{'-':>8}"
    return (
        f"{row.round:>5} {row.seconds:>10.2f}s {p['fetch']:>5.2f}s {p['math']:>5.2f}s {p['write']:>5.2f}s "
        f"{p['commit']:>5.2f}s {p.get('shards', 0.0):>5.2f}s {row.shards:>6} "
        f"{row.rss_mb:>8.0f}MB {_mb(row.written_mb):>6}MB "
        f"{_mb(row.pull_mb):>7}M {row.pull_s:>6.2f}s {row.pull_rss_mb:>6.0f}MB {row.correction_mb:>8.1f}MB "
        f"{row.disk_mb:>6.1f}MB {compact} {verdict}"
        + (
            f"  secure {row.secure_wall_s:.2f}s, unmask→done {row.unmask_s:.2f}s, "
            f"client CPU max {max(row.client_cpu_s):.2f}s"
            if row.client_cpu_s
            else ""
        )
    )


def summary(rows: list[Row], shapes: dict[str, tuple[int, int]]) -> None:
    secs = [r.seconds for r in rows]
    rss = [r.rss_mb for r in rows]
    print(
        f"median quorum→done {statistics.median(secs):.2f}s (round 1 {secs[0]:.2f}s, round {rows[-1].round} "
        f"{secs[-1]:.2f}s, ratio {secs[-1] / secs[0]:.2f}); worker peak RSS median {statistics.median(rss):.0f}MB, "
        f"max {max(rss):.0f}MB (ratio last/first {rss[-1] / rss[0]:.2f})"
    )
    if any(r.client_cpu_s for r in rows):
        cpu = [c for r in rows for c in r.client_cpu_s]
        wall = statistics.median(r.secure_wall_s for r in rows)
        print(
            f"secure rounds: first client starting → complete median {wall:.2f}s; "
            f"unmask phase → complete median {statistics.median(r.unmask_s for r in rows):.2f}s; "
            f"a client's own CPU median {statistics.median(cpu):.2f}s, max {max(cpu):.2f}s"
        )
    if any(r.pull_s for r in rows):
        pulls = [r.pull_mb for r in rows]
        print(
            f"continuing client's pull: median {_mb(statistics.median(pulls))}MB, "
            f"{statistics.median(r.pull_s for r in rows):.2f}s, peak RSS max {max(r.pull_rss_mb for r in rows):.0f}MB"
        )
        print(
            f"continuing client's disk: max {max(r.disk_mb for r in rows):.1f}MB (round "
            f"{max(rows, key=lambda r: r.disk_mb).round}), correction max {max(r.correction_mb for r in rows):.1f}MB; "
            f"the adapted modules' dense fp32 size {dense_bound_mb(shapes):.1f}MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llama-3.2-3b")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--strategy", choices=Strategy.values(), default="fedex-lora")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument(
        "--mode", choices=("sync", "buffered"), default="sync", help="buffered: each round is a FedBuff flush"
    )
    parser.add_argument(
        "--workers",
        default=None,
        help="Comma-separated aggregate worker counts to compare (each worker --concurrency 1 "
        "and CHORUS_AGGREGATION_WORKERS=1), e.g. 1,2",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="With --workers: leave the aggregate workers unpinned (by default worker i runs on core i alone, "
        "so that each is limited to one core: a worker's prefetch and hashing threads otherwise spill onto "
        "the other core)",
    )
    parser.add_argument("--no-pull", action="store_true", help="Skip the continuing client's pulls.")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="Run the first L layers of --shapes only; with --workers the model extrapolates to all of them",
    )
    parser.add_argument(
        "--secure-aggregation", action="store_true", help="SecAgg+ rounds (ffa-lora, rolora): clients in threads"
    )
    parser.add_argument("--drop", type=int, default=0, help="With --secure-aggregation: clients silent at the unmask")
    parser.add_argument(
        "--phase-timeout", type=int, default=20, help="With --secure-aggregation: --secagg-phase-timeout (seconds)"
    )
    args = parser.parse_args()
    # a killed benchmark stops its workers and redis-server too (they run in sessions of their own)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.secure_aggregation:
        torch.set_num_threads(1)  # a client's CPU seconds are its thread's own
    shapes = modules(args.shapes, args.layers)
    with tempfile.TemporaryDirectory(prefix="chorus-rounds-", dir=os.environ.get("CHORUS_BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis", args=("--appendfsync", "everysec")).start()
        env = {
            **os.environ,
            "CHORUS_REDIS_URL": redis.url,
            "CHORUS_STORE": f"file://{workdir}/store",
            "CHORUS_SPOOL_DIR": str(workdir / "spool"),
            "PYTHONUNBUFFERED": "1",
        }
        dep = Deployment(workdir, redis, env)
        sdk = ChorusClient(Settings(redis_url=redis.url, store=env["CHORUS_STORE"]))
        try:
            if args.workers:
                counts = [int(x) for x in args.workers.split(",")]
                results = {}
                for count in counts:
                    dep.start("ingest", concurrency=1)
                    cores = sorted(os.sched_getaffinity(0))
                    for i in range(count):
                        dep.start(
                            "aggregate",
                            concurrency=1,
                            extra_env={"CHORUS_AGGREGATION_WORKERS": "1"},
                            cpu=None if args.no_pin else cores[i % len(cores)],
                        )
                    time.sleep(8)
                    pinned = "unpinned" if args.no_pin else "each pinned to its own core"
                    print(f"\n{count} aggregate worker(s), --concurrency 1, CHORUS_AGGREGATION_WORKERS=1, {pinned}")
                    print(HEADER)
                    results[count] = run_federation(dep, sdk, f"w{count}", args, shapes, pull=False, echo=True)
                    dep.stop()
                base = statistics.median(r.seconds for r in results[counts[0]])
                print(f"\n{'workers':>7} {'median quorum→done':>18} {'speed-up':>8}")
                for count in counts:
                    t = statistics.median(r.seconds for r in results[count])
                    print(f"{count:>7} {t:>17.2f}s {base / t:>7.2f}x")
                scale = SHAPES[args.shapes][0] / min(args.layers, SHAPES[args.shapes][0]) if args.layers else 1.0
                _model(results, counts, _write_bandwidth(workdir), scale)
            else:
                dep.start("ingest")
                dep.start("aggregate")
                dep.start("compact")
                if args.secure_aggregation:
                    dep.start("beat")
                time.sleep(8)
                print(
                    f"{args.shapes}: {len(shapes)} modules, N={args.clients}, r={args.rank}, {args.strategy}, "
                    + ("buffered (a flush per N deltas, half 1 version stale), " if args.mode == "buffered" else "")
                    + "default settings (`chorus-mq worker --role aggregate` and `--role ingest`, default concurrency)"
                )
                print(HEADER)
                rows = run_federation(
                    dep, sdk, "bench", args, shapes, pull=not args.no_pull, echo=True, probe=Probe(sdk, workdir)
                )
                summary(rows, shapes)
        finally:
            dep.stop()
            redis.stop()


def _write_bandwidth(directory: Path, size: int = 512 * 2**20) -> float:
    """MB/s of a file written and fsynced where the file:// store lives (what bounds the write phase)."""
    path = directory / "bandwidth.probe"
    block = os.urandom(16 * 2**20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return size / 2**20 / seconds


def _model(results: dict[int, list[Row]], counts: list[int], bandwidth: float, scale: float = 1.0) -> None:
    """Where more workers stop helping: a model measured on the first worker count, checked on the others.

    Each round's manifest sums its shard tasks' wall time (``timings.shards``); with ``counts[0]`` workers
    (1 by default, each running its shards one after another) the round's length beyond that sum is its serial
    part ``s`` (the plan, the task dispatches, the commit and finalize), and the sum is the shard work ``w``;
    both are medians over the rounds, measured rather than fitted. The model T(W) = max(s + w / min(W,
    shards), written / the store's bandwidth) then predicts every other worker count run, and the printed
    error is its validation. ``scale`` (``--layers``: the preset's layers / the layers run) extrapolates:
    ``s`` and ``w`` are multiplied by it as if every part of them were per module (the plan's index reads and
    relative clip are; the dispatches are per shard and the commit mostly per round, so this overstates ``s``),
    and the shard count is capped at ``max_shards``. The two-point Amdahl fit of the earlier model is printed
    too: on a shared 2-core machine it folds the second worker's contention into its serial part.
    """
    first = counts[0]
    rows = results[first]
    if first != 1:
        print("\nthe model is measured on 1 worker: start --workers with 1")
        return
    if any(not r.phases.get("shards") for r in rows):
        print("\nno timings.shards in the manifests: the model needs workers that report their shard tasks' time")
        return
    serial = statistics.median(max(r.seconds - r.phases["shards"], 0.0) for r in rows)
    work = statistics.median(r.phases["shards"] for r in rows)
    shards = rows[0].shards
    floor = statistics.median(r.written_mb for r in rows) / bandwidth
    commit = statistics.median(r.phases["commit"] for r in rows)

    def predict(w: int, k: float = 1.0, shard_count: float = shards) -> float:
        return max(k * serial + k * work / min(w, shard_count), k * floor)

    print(
        f"\nmodel (measured with 1 worker, medians of {len(rows)} rounds): T(W) ≈ max(serial {serial:.2f}s "
        f"+ shard work {work:.2f}s / min(W, {shards} shards), written {rows[0].written_mb:.0f}MB / store "
        f"{bandwidth:.0f}MB/s = {floor:.2f}s); of the serial part the commit task itself took {commit:.3f}s"
    )
    for w in (1, 2, 4, 8, 16):
        print(f"  W={w:>2}: {predict(w):6.2f}s")
    for count in counts[1:]:
        measured = [r.seconds for r in results[count]]
        t = statistics.median(measured)
        own = statistics.median(r.phases.get("shards", 0.0) for r in results[count])
        print(
            f"validation, W={count}: predicted {predict(count):.2f}s, measured median {t:.2f}s "
            f"({', '.join(f'{x:.2f}' for x in measured)}; error {100 * (predict(count) - t) / t:+.0f}%); "
            f"its shard tasks summed {own:.2f}s against {work:.2f}s with 1 worker, so its serial part was about "
            f"{t - own / min(count, shards):.2f}s (the round beyond its tasks' sum / W)"
        )
    many = max(counts)
    if many != first:
        one, t_many = statistics.median(r.seconds for r in rows), statistics.median(r.seconds for r in results[many])
        fit_work = max((one - t_many) * many / (many - 1), 0.0)
        print(
            f"(the two-point Amdahl fit of W=1 and W={many} would say serial {max(one - fit_work, 0.0):.2f}s + "
            f"{fit_work:.2f}s / W)"
        )
    if scale != 1.0:
        capped = min(Settings().max_shards, scale * shards)
        print(f"extrapolated to the whole model ({scale:g}x the modules run here, at most {capped:g} shards):")
        for w in (1, 2, 4, 8, 16):
            print(f"  W={w:>2}: {predict(w, scale, capped):7.2f}s")
        print(f"  and at twice the layers run here, 1 worker: {predict(1, 2.0, 2 * shards):.2f}s")


if __name__ == "__main__":
    main()
