"""``chorus-mq simulate --model M --mode buffered --client-speeds ...``: buffered (FedBuff) against synchronous
rounds, the same clients, data and partitions, on a simulated wall clock.

Client ``i``'s local step takes ``speeds[i]`` time units, so one local round of ``steps`` steps takes
``speeds[i] · steps`` units. Synchronous: every round waits for its slowest client (``max(speeds) · steps``
units per round). Buffered: every client trains from the latest version, uploads naming it, and starts again
at once; every ``buffer`` accepted deltas flush into the next version (one delta per client per flush: a
client whose delta waits in the open buffer holds its next one until that buffer flushes). Both run through
the production path (SDK, ingest, plan, shards, commit; eager, in this process) with real training; the
events are processed in simulated-time order, so each client trains from the version published when it
started. Reported: the time each mode takes to reach the synchronous run's final accuracy, and the curves
(``buffered.png``, ``buffered.json`` in ``--out``). ``--buffered-until sync-time`` runs the buffered federation on
to the synchronous run's total time instead of stopping at that accuracy, so the two final accuracies compare
(what staleness costs, or not, for the same time), with the staleness of every flushed delta from the manifests.
"""

from __future__ import annotations

import heapq
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, DuplicateDelta, Rejected, StaleDelta
from chorus_mq.names import FederationMode, Strategy, TaskType

from .local_round import train_local
from .simulate_model import SimConfig, _Client, _Runner, simulation_sdk

if TYPE_CHECKING:
    from chorus_mq.manifest import Manifest
    from chorus_mq.sdk.combined import Sdk


class BufferedUntil(str, Enum):
    """When the buffered run stops: at the synchronous final accuracy (``target``; or the synchronous total time,
    whichever comes first), or only at the synchronous run's total time (``sync-time``)."""

    TARGET = "target"
    SYNC_TIME = "sync-time"


@dataclass(frozen=True)
class SpeedJob:
    """A buffered-vs-synchronous comparison: ``sim`` as ``simulate --model`` takes it, one speed per client."""

    sim: SimConfig
    speeds: tuple[float, ...]
    buffer: int = 3
    max_staleness: int = 50
    staleness_weight: str = "poly:0.5"
    server_lr: float = 1.0
    until: BufferedUntil = BufferedUntil.TARGET

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "until", BufferedUntil(self.until))
        except ValueError:
            choices = ", ".join(u.value for u in BufferedUntil)
            raise ConfigError(f"--buffered-until must be one of {choices}, got {self.until!r}") from None
        if len(self.speeds) != self.sim.clients:
            raise ConfigError(f"--client-speeds names {len(self.speeds)} clients, --clients is {self.sim.clients}")
        if not all(s > 0 for s in self.speeds):
            raise ConfigError(f"--client-speeds must be positive, got {list(self.speeds)}")
        if not 1 <= self.buffer <= self.sim.clients:
            raise ConfigError(f"--buffer must be between 1 and the number of clients, got {self.buffer}")
        if len(self.sim.strategies) != 1:
            raise ConfigError("a buffered comparison runs one strategy (fedex-lora or svd)")
        if self.sim.secure_aggregation:
            raise ConfigError("--secure-aggregation does not combine with --mode buffered (not built yet)")


@dataclass
class Curve:
    """Accuracy against simulated time: ``points`` [(time, version or round, accuracy, loss)]."""

    mode: str
    points: list[tuple[float, int, float, float]] = field(default_factory=list)
    contributions: int = 0
    refused_stale: int = 0
    #: each flushed delta's staleness in versions, from the manifests (empty in synchronous rounds)
    staleness: list[int] = field(default_factory=list)

    @property
    def final(self) -> tuple[float, float]:
        """The last evaluated version's (accuracy, loss)."""
        return self.points[-1][2], self.points[-1][3]

    @property
    def mean_staleness(self) -> float | None:
        return sum(self.staleness) / len(self.staleness) if self.staleness else None

    def time_to(self, accuracy: float) -> float | None:
        """The first time a trained version (round or version >= 1) reaches ``accuracy`` (None: never)."""
        return next((t for t, v, acc, _l in self.points if v >= 1 and acc >= accuracy - 1e-12), None)


@dataclass
class SpeedReport:
    sync: Curve
    buffered: Curve
    target: float  # the synchronous run's final accuracy
    sync_time: float | None
    buffered_time: float | None

    @property
    def ratio(self) -> float | None:
        if self.sync_time is None or self.buffered_time is None or not self.sync_time:
            return None
        return self.buffered_time / self.sync_time


def run_speed_comparison(
    job: SpeedJob,
    *,
    out_dir: Path | None = None,
    sdk_factory: Callable[[Path], Sdk] | None = None,
    redis_url: str | None = None,
    store_url: str | None = None,
    echo: Callable[[str], None] | None = print,
) -> SpeedReport:
    """Run the synchronous federation, then the buffered one until it reaches the synchronous final accuracy
    (or the synchronous run's total time has passed); write the curves when ``out_dir`` is given."""
    with simulation_sdk("chorus-sim-buffered-", sdk_factory, redis_url, store_url) as (sdk, workdir):
        report = _Comparison(job, sdk, workdir, echo).run()
        if out_dir is not None:
            write_speed_results(Path(out_dir), job, report)
        return report


class _Comparison:
    def __init__(self, job: SpeedJob, sdk: Sdk, workdir: Path, echo: Callable[[str], None] | None):
        self.job = job
        self.sdk = sdk
        self.echo = echo
        self.runner = _Runner(replace(job.sim, seeds=(job.sim.seed,)), sdk, workdir, None)
        self.steps = job.sim.steps_per_round

    def say(self, line: str) -> None:
        if self.echo:
            self.echo(line)

    def run(self) -> SpeedReport:
        from .model import build_initial_adapter, exact_model

        r = self.runner
        initial = build_initial_adapter(
            r.model_dir,
            r.workdir / "initial",
            task=TaskType.SEQ_CLS,
            labels=r.labels,
            rank=r.config.initial_rank,
            seed=r.config.seed,
        )
        start = r._evaluate(exact_model(initial, r.model_dir, task=TaskType.SEQ_CLS, labels=r.labels))
        sync = self._sync(initial, start.accuracy, start.loss)
        target = sync.points[-1][2]
        sync_time = sync.time_to(target)
        buffered = self._buffered(initial, start.accuracy, start.loss, target, sync.points[-1][0])
        report = SpeedReport(sync, buffered, target, sync_time, buffered.time_to(target))
        reached = (
            "buffered never reached it"
            if report.buffered_time is None
            else f"buffered reached it at t={report.buffered_time:g}"
            + ("" if report.ratio is None else f", {report.ratio:.2f}x the synchronous time")
        )
        self.say(
            f"synchronous final accuracy {target:.4f}, first reached at t={sync_time:g}; {reached} "
            f"({buffered.contributions} contributions, {len(buffered.points) - 1} versions, "
            f"{buffered.refused_stale} stale refusals)"
        )
        if self.job.until is BufferedUntil.SYNC_TIME:
            (sa, sl), (ba, bl) = sync.final, buffered.final
            mean = buffered.mean_staleness
            self.say(
                f"at the synchronous total time t={sync.points[-1][0]:g}: synchronous accuracy {sa:.4f} loss "
                f"{sl:.4f} ({sync.contributions} contributions); buffered accuracy {ba:.4f} loss {bl:.4f} "
                f"({buffered.contributions} contributions, {len(buffered.staleness)} flushed, mean staleness "
                + ("-" if mean is None else f"{mean:.2f}")
                + ")"
            )
        return report

    def _sync(self, initial: Path, accuracy: float, loss: float) -> Curve:
        curve = Curve("sync", [(0.0, 0, accuracy, loss)])
        fed = self.runner._create(self.job.sim.strategies[0], initial)
        per_round = max(self.job.speeds) * self.steps  # every round waits for its slowest client
        for rnd in range(1, self.job.sim.rounds + 1):
            row = self.runner._round(fed, rnd)
            curve.points.append((rnd * per_round, rnd, row.accuracy, row.loss))
            curve.contributions += row.clients
            self.say(f"sync     t={rnd * per_round:8.1f} round {rnd:3d}: accuracy {row.accuracy:.4f}")
        return curve

    def _create_buffered(self, initial: Path) -> tuple[str, list[_Client]]:
        from chorus_mq.adapters import model_decl_from_adapter
        from chorus_mq.state import FederationConfig

        r, job = self.runner, self.job
        name = f"sim-buffered-{secrets.token_hex(3)}"
        config = FederationConfig(
            name=name,
            base_model=r.model_dir.name,
            quorum=job.buffer,
            strategy=Strategy(job.sim.strategies[0]),
            task_type=TaskType.SEQ_CLS,
            labels=tuple(r.labels),
            prox_mu=job.sim.prox_mu,
            mode=FederationMode.BUFFERED,
            relative_clip=0.0,
            max_staleness=job.max_staleness,
            staleness_weight=job.staleness_weight,
            server_lr=job.server_lr,
        )
        self.sdk.create_federation(config, model=model_decl_from_adapter(initial), initial_adapter=initial)
        clients = []
        for i, idx in enumerate(r.shares):
            rank = job.sim.ranks[i % len(job.sim.ranks)] if job.sim.ranks else job.sim.initial_rank
            client = _Client(i, r.train.subset(idx), rank)
            client.secret = self.sdk.add_client(name, client.name).secret
            client.workdir = r.workdir / name / client.name
            client.workdir.mkdir(parents=True)
            clients.append(client)
        return name, clients

    def _train(self, name: str, client: _Client, n: int) -> tuple[int, Path]:
        """Client ``client``'s ``n``-th local round from the latest version: (that version, its adapter)."""
        from .local_round import save_adapter
        from .model import start_model

        r = self.runner
        version = self.sdk.state.latest_complete(name) or 0
        pulled = client.workdir / "pulled"
        self.sdk.pull(name, pulled, version)
        seed = r.config.seed * 7919 + n * 101 + client.index
        point = start_model(
            pulled,
            r.model_dir,
            task=TaskType.SEQ_CLS,
            rank=client.rank,
            alpha=2.0 * client.rank,
            labels=r.labels,
            seed=seed,
        )
        train_local(point.model, r.tokenizer, client.examples, r._train_config(seed, client.examples))
        adapter = save_adapter(
            point.model, client.workdir / f"local-{n}", base_model=r.model_dir.name, remainder=point.remainder
        )
        return version, adapter

    def _buffered(self, initial: Path, accuracy: float, loss: float, target: float, horizon: float) -> Curve:
        from .model import exact_model

        r, job = self.runner, self.job
        curve = Curve("buffered", [(0.0, 0, accuracy, loss)])
        name, clients = self._create_buffered(initial)
        view = r.workdir / name / "global"
        queue: list[tuple[float, int, int, int, Path]] = []  # (time done, order, client, base version, adapter)
        rounds_of = {c.index: 0 for c in clients}
        order = 0

        def begin(client: _Client, t: float) -> None:
            nonlocal order
            rounds_of[client.index] += 1
            version, adapter = self._train(name, client, rounds_of[client.index])
            order += 1
            heapq.heappush(queue, (t + job.speeds[client.index] * self.steps, order, client.index, version, adapter))

        for client in clients:
            begin(client, 0.0)
        held: list[tuple[int, int, Path]] = []  # deltas waiting for their client's previous buffer to flush
        seen = 0

        def settle(t: float) -> bool:
            """Evaluate every version published since the last look, releasing held deltas after each flush;
            True once the target accuracy is reached."""
            nonlocal seen, held
            while (latest := self.sdk.state.latest_complete(name) or 0) > seen:
                for v in range(seen + 1, latest):  # published in one settle (held deltas flushed): not evaluated
                    curve.staleness += self._staleness(name, v)
                seen = latest
                curve.staleness += _staleness_of(self.sdk.pull(name, view, latest))
                score = r._evaluate(exact_model(view, r.model_dir, task=TaskType.SEQ_CLS, labels=r.labels))
                curve.points.append((t, latest, score.accuracy, score.loss))
                self.say(f"buffered t={t:8.1f} version {latest:3d}: accuracy {score.accuracy:.4f}")
                if score.accuracy >= target and job.until is BufferedUntil.TARGET:
                    return True
                waiting, held = held, []
                for i, v, path in waiting:
                    if self._upload(name, clients[i], v, path, curve, held):
                        begin(clients[i], t)
            return False

        while queue:
            t, _o, index, version, adapter = heapq.heappop(queue)
            if t > horizon:
                break
            restart = self._upload(name, clients[index], version, adapter, curve, held)
            if settle(t):
                break
            if restart:
                begin(clients[index], t)
        return curve

    def _staleness(self, name: str, version: int) -> list[int]:
        """The staleness of each delta flushed into ``version``, as its manifest records it."""
        from chorus_mq.results import fetch_manifest

        return _staleness_of(fetch_manifest(self.sdk.state, self.sdk.store, name, version)[0])

    def _upload(self, name: str, client: _Client, version: int, adapter: Path, curve: Curve, held: list[Any]) -> bool:
        """Upload one delta; True when its client may start its next local round now (accepted, or refused as
        stale: it trains again from the latest version), False when it waits for its previous buffer."""
        try:
            self.sdk.upload(
                name,
                adapter,
                client.name,
                dataset_size=float(len(client.examples)),
                secret=client.secret,
                base_version=version,
            )
        except Rejected as exc:
            if exc.code == DuplicateDelta.code:
                held.append((client.index, version, adapter))
                return False
            if exc.code == StaleDelta.code:
                curve.refused_stale += 1
                return True
            raise
        curve.contributions += 1
        return True


def _staleness_of(manifest: Manifest) -> list[int]:
    """Each flushed delta's staleness (a buffered flush's manifest records every one)."""
    return [c.staleness for c in manifest.clients if c.staleness is not None]


def write_speed_results(out: Path, job: SpeedJob, report: SpeedReport) -> None:
    """``buffered.json`` (the job, both curves, the times to the target) and ``buffered.png``."""
    out.mkdir(parents=True, exist_ok=True)
    body = {
        "job": {**asdict(job), "sim": asdict(job.sim)},
        "target_accuracy": report.target,
        "sync_time": report.sync_time,
        "buffered_time": report.buffered_time,
        "ratio": report.ratio,
        "mean_staleness": report.buffered.mean_staleness,
        "sync": asdict(report.sync),
        "buffered": asdict(report.buffered),
    }
    (out / "buffered.json").write_text(json.dumps(body, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, style in ((report.sync, "o-"), (report.buffered, ".-")):
        ax.plot([p[0] for p in curve.points], [p[2] for p in curve.points], style, label=curve.mode)
    ax.axhline(report.target, color="grey", linestyle=":", label="synchronous final accuracy")
    ax.set_xlabel("simulated time (a speed-1 client's local step = 1)")
    ax.set_ylabel("held-out accuracy")
    ratio = (
        ""
        if report.ratio is None
        else f"\nbuffered reaches the synchronous final accuracy in {report.ratio:.2f}x the time"
    )
    speeds = ",".join(f"{s:g}" for s in job.speeds)
    ax.set_title(f"{job.sim.model}, client speeds {speeds}, buffer {job.buffer}{ratio}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "buffered.png", dpi=120)
    plt.close(fig)
