"""``chorus-mq simulate --model``: real models trained by simulated clients, through the production path.

One data set is split among ``clients`` (iid, Dirichlet label skew, or by a column); each
round the workers draw ``fraction_fit`` of them, and every drawn client pulls the latest
complete round into its own directory (increments only), starts from the exact global
model at its own LoRA rank, trains, and uploads through the SDK; ingest, planning, shards
and commit run as the Celery tasks, eagerly, on whatever in-process SDK ``sdk_factory``
builds. After each round the pulled global model is evaluated on held-out data and checked
against the exact weighted average of that round's client models.

The table's columns are explained by ``LEGEND``, which ``simulate`` prints under the table.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, SecAggError
from chorus_mq.names import (
    ADAPTER_WEIGHTS,
    BEST_ALONE,
    CENTRALISED,
    CLIENT_VARIATE_FILE,
    DEFAULT_LOCAL_LR,
    FED_SB_FILE,
    ExpirePolicy,
    Factor,
    LabelBalance,
    LocalOptimizer,
    RoundStatus,
    ServerOptimizer,
    Strategy,
    TaskType,
)
from chorus_mq.pulled import LocalState
from chorus_mq.secagg.params import MIN_COHORT
from chorus_mq.strategy import strategy_spec

from .data import Examples, embedded_data, load_examples, resolve_model
from .dp import DPConfig, DPReport, PrivacyLedger
from .heads import apply_head, head_state, split_head
from .local_round import Evaluation, TrainConfig, evaluate, predict, save_adapter, should_balance, train_local
from .partition import PartitionSpec, partition
from .scaffold import ScaffoldRound, save_variate
from .sim_report import Baselines, summarise, write_results

if TYPE_CHECKING:
    import torch

    from chorus_mq.sdk.combined import Sdk
    from chorus_mq.sdk.summaries import UploadResult
    from chorus_mq.state import FederationConfig

_PROBE = 64
#: with --personal-heads, the share of each client's examples held out to evaluate its personalised model
PERSONAL_HELD_OUT = 0.2
#: the deadline of a sampled round (seconds): every drawn client of a simulation uploads well before it
_SAMPLED_ROUND_TIMEOUT = 3600
#: --secure-aggregation: how long a client's upload waits for its round to publish, and how often the simulation
#: runs the beat's sweep meanwhile (seconds)
_SECURE_UPLOAD_TIMEOUT = 900.0
_SWEEP_EVERY = 0.05


@dataclass(frozen=True)
class SimRow:
    """One strategy's round (round 0: the initial model), as printed and written to CSV/JSON."""

    strategy: str
    round: int
    clients: int
    accuracy: float
    loss: float
    exact_error: float | None = None
    remainder: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    epsilon: float | None = None
    #: ``--personal-heads``: mean over clients of each one's model (the round's body, its own head) on its own
    #: held-out share
    personal_accuracy: float | None = None
    personal_loss: float | None = None
    #: the mean over the round's clients of their update's cosine to the aggregate (from the manifest)
    cosine: float | None = None
    seed: int = 0


#: local steps per client round unless ``--steps-per-round`` says otherwise
DEFAULT_STEPS_PER_ROUND = 10


@dataclass(frozen=True)
class SimConfig:
    """Everything a model simulation depends on (written next to the results): the job ``simulate --model``
    builds once; choices are normalised to their names here."""

    model: str = "minilm"
    dataset: str = "rotten-tomatoes"
    clients: int = 3
    rounds: int = 2
    partition: str = "iid"
    fraction_fit: float = 1.0
    ranks: tuple[int, ...] | None = None
    strategies: tuple[str, ...] = (str(Strategy.FEDEX_LORA),)
    centralised: bool = False
    dp_epsilon: float | None = None
    steps_per_round: int = DEFAULT_STEPS_PER_ROUND
    batch_size: int = 16
    lr: float = DEFAULT_LOCAL_LR
    max_length: int = 64
    test_examples: int = 300
    examples_per_client: int | None = None
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    optimizer: str = "adamw"
    #: auto | on | off, decided per client as ``train`` does (see ``local_round.should_balance``)
    balance_labels: str = "auto"
    #: FedProx weight of every federation (``federation create --prox-mu``)
    prox_mu: float = 0.0
    #: also train every client alone (rounds x steps on its own data) and report the best
    alone: bool = False
    #: SCAFFOLD control variates in every federation (``federation create --scaffold``)
    scaffold: bool = False
    #: every federation keeps its clients' heads local (``federation create --personal-heads``); each
    #: client's share is split, ``PERSONAL_HELD_OUT`` of it held out to evaluate its own model
    personal_heads: bool = False
    #: every seed the simulation runs (each its own split, partition and initial adapter); ``seed`` is one
    seeds: tuple[int, ...] = ()
    #: the server optimiser of every federation and its step size (``federation create --server-opt``)
    server_opt: str = "none"
    #: None: the optimiser's own default (``ServerOptimizer.default_lr``)
    server_lr: float | None = None
    #: fedavgm's momentum (0: the plain average stepped at ``server_lr``)
    server_momentum: float = 0.9
    #: every federation runs secure aggregation (``federation create --secure-aggregation``): each round the
    #: drawn clients upload through the real protocol together, and the workers see only the masked sum
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks) if self.ranks else None)
        object.__setattr__(self, "strategies", tuple(str(Strategy(s)) for s in self.strategies))
        object.__setattr__(self, "optimizer", str(LocalOptimizer(self.optimizer)))
        object.__setattr__(self, "balance_labels", str(LabelBalance(self.balance_labels)))
        object.__setattr__(self, "seeds", tuple(self.seeds) if self.seeds else (self.seed,))

    @property
    def server_step_size(self) -> float:
        """The server optimiser's step size, as the federation resolves ``server_lr``."""
        return ServerOptimizer(self.server_opt).default_lr if self.server_lr is None else self.server_lr

    @property
    def per_round(self) -> int:
        """Clients drawn per round."""
        return max(1, min(self.clients, round(self.fraction_fit * self.clients)))

    @property
    def initial_rank(self) -> int:
        return max(self.ranks) if self.ranks else 8


@dataclass
class _Client:
    """One simulated party: its data, rank, signing secret, own pulled directory and privacy ledger."""

    index: int
    examples: Examples
    rank: int  # fixed, even when the global adapter's rank grows (stack): a lower rank starts from its approximation
    secret: str = ""
    workdir: Path = Path()
    #: --personal-heads: its own examples held out, and its own head (None until it first trains)
    held_out: Examples | None = None
    head: dict[str, torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return f"client-{self.index}"

    ledger: PrivacyLedger | None = None


@dataclass
class _ClientRound:
    """One client's local round in the simulation: what it uploads and what the round's end makes its own."""

    adapter: Path  # the PEFT form, for the oracle
    upload: Path  # what goes up (Fed-SB: lora_R; otherwise the adapter)
    gap: float  # the start's relative remainder (a rank below the global's)
    report: DPReport | None  # its DP spend (--dp-epsilon)
    lr_sum: float | None = None
    #: SCAFFOLD: its next variate and the basis it is expressed in
    variate: tuple[dict[str, Any], dict[str, Any]] | None = None
    #: --personal-heads: the head it trained (its own once the round completes)
    head: dict[str, torch.Tensor] | None = None


@dataclass
class _Federation:
    """One strategy's federation as the simulation sees it."""

    strategy: str
    name: str
    clients: list[_Client]
    server_view: Path  # the simulation's own pulled directory (evaluation and the oracle)
    increments: dict[int, tuple[int, int]] = field(default_factory=dict)  # round -> (adapter, residual) bytes
    #: the oracle's own server optimiser state (float64), per module and head
    opt_state: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_model_simulation(
    *,
    out_dir: Path | None = None,
    sdk_factory: Callable[[Path], Sdk] | None = None,
    redis_url: str | None = None,
    store_url: str | None = None,
    as_json: bool = False,
    echo: Callable[[str], None] | None = print,
    **options: Any,
) -> list[SimRow]:
    """:func:`run_simulation_job` with the :class:`SimConfig` fields as keywords (benchmarks, tests); a
    ``steps_per_round`` or ``seeds`` of None takes the default."""
    for name in ("steps_per_round", "seeds"):
        if options.get(name, 0) is None:
            del options[name]
    return run_simulation_job(
        SimConfig(**options),
        out_dir=out_dir,
        sdk_factory=sdk_factory,
        redis_url=redis_url,
        store_url=store_url,
        as_json=as_json,
        echo=echo,
    )


def run_simulation_job(
    config: SimConfig,
    *,
    out_dir: Path | None = None,
    sdk_factory: Callable[[Path], Sdk] | None = None,
    redis_url: str | None = None,
    store_url: str | None = None,
    as_json: bool = False,
    echo: Callable[[str], None] | None = print,
) -> list[SimRow]:
    """Run one federation per strategy (plus the centralised baseline) for each of ``config.seeds``; return
    every row."""
    seeds = config.seeds
    _check(config)
    show = None if as_json else echo
    with simulation_sdk("chorus-sim-model-", sdk_factory, redis_url, store_url) as (sdk, workdir):
        rows: list[SimRow] = []
        baselines: list[Baselines] = []
        for s in seeds:
            if show and len(seeds) > 1:
                show(f"seed {s}:")
            runner = _Runner(replace(config, seed=s), sdk, workdir / f"seed-{s}", show)
            rows.extend(runner.run())
            baselines.append(runner.baselines)
        if show:
            show(LEGEND)
            if len(seeds) > 1:
                show(summary_table(rows, len(seeds)))
        if out_dir is not None:
            write_results(Path(out_dir), asdict(config), rows, baselines, title=_title(config))
            if show:
                show(f"wrote {Path(out_dir) / 'results.csv'}, summary.csv, results.json and accuracy.png")
        if as_json and echo:
            echo(json.dumps([asdict(r) for r in rows], indent=2))
        return rows


@contextmanager
def simulation_sdk(
    prefix: str, sdk_factory: Callable[[Path], Sdk] | None, redis_url: str | None, store_url: str | None
) -> Iterator[tuple[Sdk, Path]]:
    """The SDK a simulation runs through (``sdk_factory``'s, else an embedded one: eager workers in this process)
    over a scratch work dir, with torch on one thread; all undone on exit, the embedded workers uninstalled."""
    import torch

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    threads = torch.get_num_threads()
    owned = sdk_factory is None
    try:
        torch.set_num_threads(1)  # the eager workers aggregate on their own threads; one each avoids oversubscribing
        yield (sdk_factory or _default_factory(redis_url, store_url))(workdir), workdir
    finally:
        torch.set_num_threads(threads)
        if owned:
            from chorus_mq.workers import runtime

            runtime.install(None)
        shutil.rmtree(workdir, ignore_errors=True)


def _check(config: SimConfig) -> None:
    if config.clients < 1 or config.rounds < 1:
        raise ConfigError("--clients and --rounds must be positive")
    if not 0 < config.fraction_fit <= 1:
        raise ConfigError(f"--fraction-fit must be in (0, 1], got {config.fraction_fit}")
    if config.ranks and min(config.ranks) < 1:
        raise ConfigError(f"--ranks must be positive, got {list(config.ranks)}")
    if not config.strategies:
        raise ConfigError("no strategies to run")
    if config.scaffold and config.ranks and len(set(config.ranks)) > 1:
        raise ConfigError(
            f"--scaffold needs one rank for every client (its variates live on the global adapter's tensors), "
            f"got --ranks {','.join(map(str, config.ranks))}"
        )
    if config.secure_aggregation and config.per_round < MIN_COHORT:
        raise ConfigError(
            f"--secure-aggregation needs at least {MIN_COHORT} clients in every round (a sum of 2 reveals each "
            f"to the other), got {config.per_round}"
        )
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"--seeds must be distinct, got {list(config.seeds)}")
    for strategy in config.strategies:  # refused before any training, as federation create would refuse it
        _federation_config(config, "check", strategy, "check", ())


def _default_factory(redis_url: str | None, store_url: str | None) -> Callable[[Path], Sdk]:
    from chorus_mq.sdk.combined import Sdk

    def factory(workdir: Path) -> Sdk:
        return Sdk.embedded(workdir, redis_url=redis_url, store_url=store_url)

    return factory


class _Runner:
    def __init__(self, config: SimConfig, sdk: Sdk, workdir: Path, echo: Callable[[str], None] | None):
        from .model import load_tokenizer

        self.config = config
        self.sdk = sdk
        self.workdir = workdir
        self.echo = echo
        self.model_dir = resolve_model(config.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.labels, self.train, self.test = _load_split(config)
        self.probe = self.test.head(_PROBE)
        self.shares = _shares(config, self.train)
        #: --personal-heads: each client's own held-out examples (taken from its share: the rest trains)
        self.local_tests: list[list[int]] = [[] for _ in self.shares]
        if config.personal_heads:
            self.shares, self.local_tests = _split_shares(self.shares, PERSONAL_HELD_OUT)
        pooled = [self.train.labels[i] for idx in self.shares for i in idx] if self.train.labels else []
        self.baselines = Baselines.of(config.seed, len(self.labels), pooled, self.test.labels or ())

    def run(self) -> list[SimRow]:
        from .model import build_initial_adapter, exact_model

        initial = build_initial_adapter(
            self.model_dir,
            self.workdir / "initial",
            task=TaskType.SEQ_CLS,
            labels=self.labels,
            rank=self.config.initial_rank,
            seed=self.config.seed,
        )
        start_model_ = exact_model(initial, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels)
        start = self._evaluate(start_model_)
        self._say(_HEADER)
        rows: list[SimRow] = []
        for strategy in self.config.strategies:
            federation = self._create(strategy, initial)
            mine = self._personal(start_model_, federation.clients) if self.config.personal_heads else None
            rows.append(
                SimRow(
                    strategy,
                    0,
                    0,
                    start.accuracy,
                    start.loss,
                    personal_accuracy=None if mine is None else mine.accuracy,
                    personal_loss=None if mine is None else mine.loss,
                    seed=self.config.seed,
                )
            )
            self._say(_format(rows[-1]))
            for r in range(1, self.config.rounds + 1):
                rows.append(self._round(federation, r))
                self._say(_format(rows[-1]))
        if self.config.centralised:
            rows.extend(self._centralised(initial, start))
        if self.config.alone:
            rows.extend(self._alone(initial, start))
        return rows

    def _say(self, line: str) -> None:
        if self.echo:
            self.echo(line)

    # -- a federation per strategy ------------------------------------------------------------

    def _create(self, strategy: str, initial: Path) -> _Federation:
        from chorus_mq.adapters import model_decl_from_adapter

        cfg = self.config
        name = f"sim-{strategy}-{secrets.token_hex(3)}"
        fed_config = _federation_config(cfg, name, strategy, self.model_dir.name, self.labels)
        if strategy_spec(strategy).sandwich:  # Fed-SB: the same head, B and A the seeded frame (R = 0)
            from .model import write_fed_sb_frame

            framed = self.workdir / "initial-fed-sb"
            shutil.rmtree(framed, ignore_errors=True)
            shutil.copytree(initial, framed)
            write_fed_sb_frame(framed, self.config.seed)
            initial = framed
        self.sdk.create_federation(
            fed_config,
            model=model_decl_from_adapter(initial),
            initial_adapter=initial,
            # the workers draw the same clients for every strategy of a seed, and again when it is rerun
            selection_seed=f"simulation-{self.config.seed}",
        )
        parties = []
        for i, idx in enumerate(self.shares):
            rank = cfg.ranks[i % len(cfg.ranks)] if cfg.ranks else cfg.initial_rank
            client = _Client(i, self.train.subset(idx), rank)
            if self.local_tests[i]:
                client.held_out = self.train.subset(self.local_tests[i])
            # a secure round's weights are fixed before any input, from what the operator registered: the
            # dataset sizes a plain upload would claim
            size = float(len(client.examples)) if cfg.secure_aggregation else None
            client.secret = self.sdk.add_client(name, client.name, dataset_size=size).secret
            client.workdir = self.workdir / name / client.name
            client.workdir.mkdir(parents=True)
            if cfg.dp_epsilon is not None:
                train = self._train_config(0, client.examples)
                n = len(client.examples)
                client.ledger = PrivacyLedger.open(
                    client.workdir / "privacy.json",
                    DPConfig(cfg.dp_epsilon),
                    sample_rate=train.sample_rate(n),
                    planned_steps=cfg.rounds * train.planned_steps(n),
                )
            parties.append(client)
        server_view = self.workdir / name / "global"
        self.sdk.pull(name, server_view, 0)
        return _Federation(strategy, name, parties, server_view)

    def _train_config(self, seed: int, examples: Examples) -> TrainConfig:
        cfg = self.config
        private = cfg.dp_epsilon is not None
        balance = should_balance(cfg.balance_labels, examples, len(self.labels), TaskType.SEQ_CLS, private=private)
        return TrainConfig(
            task=TaskType.SEQ_CLS,
            steps=cfg.steps_per_round,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            max_length=cfg.max_length,
            seed=seed,
            optimizer=LocalOptimizer(cfg.optimizer),
            balance_labels=balance,
            prox_mu=cfg.prox_mu,
        )

    def _selected(self, fed: _Federation, r: int) -> tuple[int, list[_Client]]:
        """The round this one starts from, and the clients the workers drew for it."""
        status = self.sdk.status(fed.name)
        if status.current_round != r or status.state != RoundStatus.OPEN:
            raise ConfigError(f"{fed.name}: expected round {r} open, found round {status.current_round} {status.state}")
        start = status.latest_complete or 0
        by_name = {c.name: c for c in fed.clients}
        if status.selected:
            return start, [by_name[name] for name in status.selected]
        if self.config.per_round < len(fed.clients):  # the workers did not draw: draw here, seeded
            return start, random.Random(self.config.seed * 1009 + r).sample(fed.clients, self.config.per_round)
        return start, list(fed.clients)

    def _round(self, fed: _Federation, r: int) -> SimRow:
        """Round ``r`` of ``fed``: each drawn client pulls, trains and uploads; the round completes; the pulled
        model is checked against the float64 oracle and evaluated."""
        started = time.perf_counter()
        start, chosen = self._selected(fed, r)
        trained: dict[str, _ClientRound] = {}
        secure: list[tuple[_Client, Path]] = []  # --secure-aggregation: the uploads, sent together once all trained
        up = down = 0
        for client in chosen:
            down += self._pull(fed, client, client.workdir / "pulled", start)
            done = trained[client.name] = self._train_client(fed, client, r)
            if self.config.secure_aggregation:  # every drawn client's upload takes part in the phases together
                secure.append((client, done.upload))
                continue
            up += self._upload(fed, client, r, done)
        if secure:
            up += self._secure_uploads(fed, r, secure)
        self._complete(fed, r, chosen, trained)
        return self._check_round(fed, r, chosen, trained, up=up, down=down, started=started)

    def _train_client(self, fed: _Federation, client: _Client, r: int) -> _ClientRound:
        """``client``'s local round from its pulled directory: the adapter it uploads, kept in its work dir, and
        what the round's end makes its own (SCAFFOLD variate, personal head); its DP spend is counted here."""
        from .model import freeze_factor, start_model
        from .sandwich import attach_r, write_r_upload

        pulled = client.workdir / "pulled"
        spec = strategy_spec(fed.strategy)
        # SCAFFOLD and a frozen shared factor train the global adapter's own tensors (its rank and scaling)
        own_tensors = self.config.scaffold or not spec.own_rank
        start_point = start_model(
            pulled,
            self.model_dir,
            task=TaskType.SEQ_CLS,
            rank=None if own_tensors else client.rank,
            alpha=None if own_tensors else 2.0 * client.rank,
            labels=self.labels,
            seed=self.config.seed * 7919 + r,
            keep_remainder=spec.keeps_remainder,
        )
        model = start_point.model
        frozen = spec.frozen(r)
        if frozen is not None:
            freeze_factor(model, frozen)  # uploaded as published, bit for bit
        attached = attach_r(model, pulled) if spec.sandwich else None  # Fed-SB: lora_B = B_frozen @ R
        own = client.workdir / CLIENT_VARIATE_FILE
        variates = ScaffoldRound.begin(model, pulled, own) if self.config.scaffold else None
        if client.head is not None:
            apply_head(model, client.head)  # --personal-heads: the global body, this client's own head
        train = self._train_config(self.config.seed * 7919 + r * 101 + client.index, client.examples)
        privacy, report = None, None
        if client.ledger is not None:
            report = client.ledger.report(r, train.planned_steps(len(client.examples)))
            privacy = (client.ledger.noise_multiplier, client.ledger.config.clip)
        result = train_local(
            model,
            self.tokenizer,
            client.examples,
            train,
            privacy=privacy,
            correction=None if variates is None else variates.correction(),
        )
        trained_r = attached.finish() if attached is not None else None
        adapter = save_adapter(
            model, client.workdir / f"round-{r}", base_model=self.model_dir.name, remainder=start_point.remainder
        )
        upload = adapter  # Fed-SB: lora_R goes up; the PEFT form (B R, A) stays for the oracle
        if trained_r is not None:
            upload = client.workdir / f"round-{r}-upload"
            shutil.rmtree(upload, ignore_errors=True)
            shutil.copytree(adapter, upload)
            write_r_upload(upload, trained_r)
        done = _ClientRound(adapter, upload, start_point.gap.relative, report)
        if variates is not None:
            done.lr_sum = result.steps * train.lr
            done.variate = (variates.finish(model, done.lr_sum), variates.basis())
        if self.config.personal_heads:
            done.head = split_head(adapter)  # the body goes up; the head stays
        if client.ledger is not None and report is not None:
            client.ledger.commit(r, train.planned_steps(len(client.examples)))
        return done

    def _upload(self, fed: _Federation, client: _Client, r: int, done: _ClientRound) -> int:
        """``client``'s plain upload of round ``r`` through the SDK (as ``train`` sends it); the bytes sent."""
        report = done.report
        uploaded = self.sdk.upload(
            fed.name,
            done.upload,
            client.name,
            dataset_size=float(len(client.examples)),
            round_=r,
            secret=client.secret,
            dp=None if report is None else report.to_dict(),
            lr_sum=done.lr_sum,
            label_counts=None if report is not None else self._label_counts(client.examples),
        )
        return uploaded.bytes

    def _complete(
        self, fed: _Federation, r: int, chosen: Sequence[_Client], trained: Mapping[str, _ClientRound]
    ) -> None:
        """Wait for round ``r`` to complete (anything else ends the simulation); its clients' variates and heads
        become theirs."""
        summary = self.sdk.wait_round(fed.name, r, timeout=600)
        if summary.state != RoundStatus.COMPLETE:
            raise ConfigError(f"{fed.name} round {r} ended {summary.state}: {summary.reason}")
        for client in chosen:  # the round completed with their updates: their variates move on
            variate = trained[client.name].variate
            if variate is not None:
                save_variate(client.workdir / CLIENT_VARIATE_FILE, *variate, r)
        for client in chosen:  # the round completed: its heads are theirs
            head = trained[client.name].head
            client.head = client.head if head is None else head

    def _check_round(
        self,
        fed: _Federation,
        r: int,
        chosen: Sequence[_Client],
        trained: Mapping[str, _ClientRound],
        *,
        up: int,
        down: int,
        started: float,
    ) -> SimRow:
        """Pull round ``r`` into the simulation's own view; its row: the pulled model's distance from the float64
        oracle (the previous global plus the manifest's weighted updates), its evaluation and the round's costs."""
        from .model import corrected_base, exact_model, read_adapter

        previous = corrected_base(fed.server_view, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels)
        started_from = read_adapter(fed.server_view)  # the global this round's clients trained from
        spec = strategy_spec(fed.strategy)
        frame = _trained_tensors(fed.server_view, spec)  # a linear strategy's factors, as they started
        manifest = self.sdk.pull(fed.name, fed.server_view, r)
        fed.increments[r] = (manifest.adapter_bytes, manifest.residual_bytes)
        seconds = time.perf_counter() - started
        weights = {c.client_id: float(c.weight) for c in manifest.clients}
        total, heads = weighted_updates([(weights[name], done.adapter) for name, done in trained.items()])
        if self.config.server_opt != ServerOptimizer.NONE:
            linear = None
            if spec.linear:  # its optimiser steps the factor the clients trained (server_opt.step_trained)
                uploads = [(weights[name], _trained_tensors(done.upload, spec)) for name, done in trained.items()]
                linear = (spec.trainable(r), frame, uploads)
            total, heads = self._server_step(fed, started_from, total, heads, linear)
        if self.config.personal_heads:  # the clients send no head: the published one is round 0's
            heads = {k: v.double() for k, v in read_adapter(fed.server_view)[1].items()}
        oracle = apply_updates(previous, total, heads)
        pulled_model = exact_model(fed.server_view, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels)
        error = _max_error(self._logits(pulled_model), self._logits(oracle))
        score = self._evaluate(pulled_model)
        personal = self._personal(pulled_model, fed.clients) if self.config.personal_heads else None
        cosines = [c.cosine for c in manifest.clients if c.cosine is not None]
        worst_remainder, epsilon = 0.0, None
        for done in trained.values():
            worst_remainder = max(worst_remainder, done.gap)
            if done.report is not None:
                epsilon = max(epsilon or 0.0, done.report.epsilon)
        return SimRow(
            fed.strategy,
            r,
            len(chosen),
            score.accuracy,
            score.loss,
            error,
            worst_remainder,
            up,
            down,
            seconds,
            epsilon,
            None if personal is None else personal.accuracy,
            None if personal is None else personal.loss,
            cosine=sum(cosines) / len(cosines) if cosines else None,
            seed=self.config.seed,
        )

    def _secure_uploads(self, fed: _Federation, r: int, uploads: Sequence[tuple[_Client, Path]]) -> int:
        """Round ``r``'s uploads through secure aggregation: each client's ``upload`` (the SDK's, as ``train`` runs
        it) on its own thread, since every phase waits for the whole cohort, while this thread runs the beat's
        sweep (it opens the advertise phase and closes a phase at its deadline). The phase records each client
        sends are pumped, and the tasks they fire run, on that client's thread. Returns the bytes uploaded
        (the masked inputs)."""
        from concurrent.futures import ThreadPoolExecutor, wait

        from chorus_mq.workers.inprocess import sweep_once

        sdk = self.sdk

        def upload(client: _Client, path: Path) -> UploadResult:
            import torch

            torch.set_num_threads(1)  # the unmask runs on a client's thread beside the others
            return sdk.upload(
                fed.name,
                path,
                client.name,
                round_=r,
                secret=client.secret,
                timeout=_SECURE_UPLOAD_TIMEOUT,
                secure_state_dir=client.workdir / "secagg",
            )

        with ThreadPoolExecutor(max_workers=len(uploads), thread_name_prefix=f"secure-{r}") as pool:
            futures = [pool.submit(upload, client, path) for client, path in uploads]
            waiting = set(futures)
            while waiting:  # a client that fails is a dropout to the others: its phase closes at its deadline
                sweep_once(sdk.settings, sdk.redis, sdk.store)
                _, waiting = wait(waiting, timeout=_SWEEP_EVERY)
            results = [f.result() for f in futures]
        missing = [res.client_id for res in results if res.status != "summed"]
        if missing:
            raise SecAggError(f"{fed.name} round {r}: the secure sum left out {', '.join(missing)}")
        return sum(sdk.store.size(res.object_key) or 0 for res in results)

    def _personal(self, model: Any, clients: Sequence[_Client]) -> Evaluation:
        """Each client's model (``model``'s body, the client's own head: round 0's until it first trains) on its
        own held-out examples; the mean over clients (each client counts once, whatever its share)."""
        scores = []
        initial = head_state(model)
        for client in clients:
            if client.held_out is None or not len(client.held_out):
                continue
            apply_head(model, client.head if client.head is not None else initial)
            scores.append(
                evaluate(
                    model, self.tokenizer, client.held_out, task=TaskType.SEQ_CLS, max_length=self.config.max_length
                )
            )
        apply_head(model, initial)
        if not scores:
            raise ConfigError("--personal-heads: no client has examples to hold out (give them more data)")
        n = len(scores)
        return Evaluation(
            sum(s.loss for s in scores) / n, sum(s.accuracy for s in scores) / n, sum(s.examples for s in scores)
        )

    def _label_counts(self, examples: Examples) -> dict[str, int]:
        """What a client declares with its upload, as ``train`` does (not under DP)."""
        labels = examples.labels or ()
        return {name: labels.count(i) for i, name in enumerate(self.labels)}

    def _server_step(
        self,
        fed: _Federation,
        started_from: Any,
        total: dict[str, Any],
        heads: dict[str, Any],
        trained: tuple[Any, dict[str, Any], list[tuple[float, dict[str, Any]]]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The oracle of a round under a server optimiser: each module's update is the published adapter the
        clients started from plus the optimiser's step on (exact average − that adapter), in float64 with
        the oracle's own state; each head the previous head plus its step (the average as it is when the
        previous global had none). A linear strategy (``trained``: the round's factor, the tensors the clients
        started from, and each client's weight and uploaded tensors) steps the trained factor instead, the
        frame as published."""
        import torch

        from chorus_mq.aggregation.server_opt import ServerOptConfig, step

        cfg = ServerOptConfig(
            ServerOptimizer(self.config.server_opt),
            lr=self.config.server_step_size,
            momentum=self.config.server_momentum,
        )
        factors, old_heads, _targets = started_from
        stepped, stepped_heads = {}, {}
        for module, update in total.items():
            if trained is not None:
                factor, start, uploads = trained
                A, B, scaling = (t.double() if isinstance(t, torch.Tensor) else t for t in factors[module])
                key = f"{module}.{factor}.weight"
                old = start[key].double()
                mean = sum(w * tensors[key].double() for w, tensors in uploads)
                change, fed.opt_state[key] = step(mean - old, fed.opt_state.get(key), cfg)
                new = old + change
                if factor == Factor.LORA_R:  # Fed-SB: the frame's B (in ``start``) @ R @ A
                    stepped[module] = scaling * (start[f"{module}.lora_B.weight"].double() @ new @ A)
                elif factor == Factor.LORA_A:
                    stepped[module] = scaling * (B @ new)
                else:
                    stepped[module] = scaling * (new @ A)
                continue
            old = torch.zeros_like(update)
            if module in factors:
                A, B, scaling = factors[module]
                old = scaling * (B.double() @ A.double())
            change, fed.opt_state[module] = step(update - old, fed.opt_state.get(module), cfg)
            stepped[module] = old + change
        for key, head in heads.items():
            if key not in old_heads:
                stepped_heads[key] = head
                continue
            change, fed.opt_state[key] = step(head - old_heads[key].double(), fed.opt_state.get(key), cfg)
            stepped_heads[key] = old_heads[key].double() + change
        return stepped, stepped_heads

    def _pull(self, fed: _Federation, client: _Client, pulled: Path, start: int) -> int:
        """Bring the client's directory to round ``start``; the bytes that took, from the manifests."""
        held = LocalState.load(pulled)  # the round the directory held before: its increments are not fetched
        after = held.round if held is not None and held.federation == fed.name else -1
        manifest = self.sdk.pull(fed.name, pulled, start)
        fed.increments.setdefault(start, (manifest.adapter_bytes, manifest.residual_bytes))
        residuals = sum(res for r, (_a, res) in fed.increments.items() if after < r <= start)
        return manifest.adapter_bytes + residuals

    def _logits(self, model: Any) -> torch.Tensor:
        return predict(model, self.tokenizer, list(self.probe.texts), max_length=self.config.max_length)

    def _evaluate(self, model: Any) -> Evaluation:
        return evaluate(model, self.tokenizer, self.test, task=TaskType.SEQ_CLS, max_length=self.config.max_length)

    # -- the centralised baseline ---------------------------------------------------------------

    def _centralised(self, initial: Path, start: Evaluation) -> list[SimRow]:
        from .model import exact_model

        cfg = self.config
        pooled = self.train.subset(sorted(i for idx in self.shares for i in idx))
        model = exact_model(initial, self.model_dir, task=TaskType.SEQ_CLS, trainable=True, labels=self.labels)
        rows = [SimRow(CENTRALISED, 0, 0, start.accuracy, start.loss, seed=cfg.seed)]
        self._say(_format(rows[-1]))
        for r in range(1, cfg.rounds + 1):
            started = time.perf_counter()
            train = TrainConfig(
                task=TaskType.SEQ_CLS,
                steps=cfg.steps_per_round * cfg.per_round,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                max_length=cfg.max_length,
                seed=cfg.seed + r,
                optimizer=LocalOptimizer(cfg.optimizer),
            )
            train_local(model, self.tokenizer, pooled, train)
            seconds = time.perf_counter() - started
            score = self._evaluate(model)
            rows.append(SimRow(CENTRALISED, r, 1, score.accuracy, score.loss, seconds=seconds, seed=cfg.seed))
            self._say(_format(rows[-1]))
        return rows

    # -- the best single client ------------------------------------------------------------------

    def _alone(self, initial: Path, start: Evaluation) -> list[SimRow]:
        """Each client trains alone from the initial model for every round's steps (the local work it could
        do without a federation, as ``train`` would: its own label balance); the best on held-out data."""
        from .model import exact_model

        cfg = self.config
        best: tuple[Evaluation, int] | None = None
        started = time.perf_counter()
        for i, idx in enumerate(self.shares):
            examples = self.train.subset(idx)
            model = exact_model(initial, self.model_dir, task=TaskType.SEQ_CLS, trainable=True, labels=self.labels)
            base = self._train_config(cfg.seed * 7919 + i, examples)
            train_local(
                model, self.tokenizer, examples, replace(base, steps=cfg.steps_per_round * cfg.rounds, prox_mu=0.0)
            )
            score = self._evaluate(model)
            self._say(f"{'alone':<12} client-{i}: accuracy {score.accuracy:.3f} loss {score.loss:.4f}")
            if best is None or score.accuracy > best[0].accuracy:
                best = (score, i)
        assert best is not None
        seconds = time.perf_counter() - started
        rows = [
            SimRow(BEST_ALONE, 0, 0, start.accuracy, start.loss, seed=cfg.seed),
            SimRow(BEST_ALONE, cfg.rounds, 1, best[0].accuracy, best[0].loss, seconds=seconds, seed=cfg.seed),
        ]
        self._say(_format(rows[-1]))
        return rows


def weighted_average(
    base: Any, clients: Sequence[tuple[float, Path]], *, head: Mapping[str, torch.Tensor] | None = None
) -> Any:
    """``base`` plus Σ wᵢ sᵢ Bᵢ Aᵢ (float64 sum) on each LoRA module and the heads averaged: the exact
    weighted average of client models that all started from ``base`` (modified in place and returned).
    ``head`` (``--personal-heads``: the clients send none) is the head to give it instead."""
    total, heads = weighted_updates(clients)
    if head is not None:
        heads = {k: v.double() for k, v in head.items()}
    return apply_updates(base, total, heads)


def _trained_tensors(directory: Path, spec: Any) -> dict[str, Any]:
    """A directory's tensors a linear strategy trains or keeps as its frame: Fed-SB's own file (frame and R)
    in a pulled directory, else the adapter weights (an upload's ``lora_R`` lies there); {} for the others."""
    from safetensors.torch import load_file

    if not spec.linear:
        return {}
    own = directory / FED_SB_FILE
    return load_file(str(own if spec.sandwich and own.is_file() else directory / ADAPTER_WEIGHTS))


def weighted_updates(clients: Sequence[tuple[float, Path]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per module Σ wᵢ sᵢ Bᵢ Aᵢ and per head Σ wᵢ hᵢ of the saved client adapters, in float64."""
    from .model import read_adapter

    total: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    for weight, adapter in clients:
        factors, client_head, _targets = read_adapter(adapter)
        for module, (A, B, scaling) in factors.items():
            update = weight * scaling * (B.double() @ A.double())
            total[module] = total[module] + update if module in total else update
        for key, tensor in client_head.items():
            heads[key] = heads[key] + weight * tensor.double() if key in heads else weight * tensor.double()
    return total, heads


def apply_updates(base: Any, total: dict[str, Any], heads: dict[str, Any]) -> Any:
    """``base`` with each module's weight plus its update (in float64) and each head replaced (in place)."""
    import torch

    from .model import PEFT_PREFIX, find_module

    with torch.no_grad():
        for module, update in total.items():
            layer = find_module(base, module)
            layer.weight.copy_((layer.weight.double() + update).float())
        params = dict(base.named_parameters())
        for key, tensor in heads.items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(tensor.float())
    return base.eval()


def _federation_config(
    config: SimConfig, name: str, strategy: str, base_model: str, labels: Sequence[str]
) -> FederationConfig:
    from chorus_mq.state import FederationConfig

    k = config.per_round
    return FederationConfig(
        name=name,
        base_model=base_model,
        quorum=k,
        strategy=Strategy(strategy),
        clients_per_round=k if k < config.clients else 0,
        # sampling needs a deadline that draws again (a drawn client may never upload); every drawn
        # client of a simulation uploads, so it is long
        round_timeout=_SAMPLED_ROUND_TIMEOUT if k < config.clients else 0,
        expire_policy=ExpirePolicy.EXPIRE if k < config.clients else ExpirePolicy.EXTEND,
        task_type=TaskType.SEQ_CLS,
        labels=tuple(labels),
        prox_mu=config.prox_mu,
        scaffold=config.scaffold,
        personal_heads=config.personal_heads,
        server_opt=ServerOptimizer(config.server_opt),
        server_lr=config.server_lr,
        # only fedavgm has a momentum (the config refuses a setting its optimiser does not use)
        server_momentum=(
            config.server_momentum if config.server_opt == ServerOptimizer.FEDAVGM else FederationConfig.server_momentum
        ),
        secure_aggregation=config.secure_aggregation,
        # as `federation create` decides it: relative clipping needs each update's norm, which secure
        # aggregation hides (off there), and is on by default otherwise
        relative_clip=0.0 if config.secure_aggregation else FederationConfig.relative_clip,
    )


def _load_split(config: SimConfig) -> tuple[tuple[str, ...], Examples, Examples]:
    """The federation's labels, and the data shuffled with the seed: held-out first, the rest to train."""
    embedded = embedded_data(config.dataset)
    group = PartitionSpec.parse(config.partition).column
    if embedded is not None:
        labels = embedded.labels
        examples = load_examples(config.dataset, group_column=group)
    else:
        from .data import read_table

        values = read_table(Path(config.dataset)).column(config.label_column).to_pylist()
        distinct = set(values)
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in distinct)
        labels = tuple(str(v) for v in sorted(distinct, key=lambda v: v if numeric else str(v)))
        examples = load_examples(
            Path(config.dataset),
            text_column=config.text_column,
            label_column=config.label_column,
            labels=labels,
            group_column=group,
        )
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    if len(order) <= config.test_examples + 2 * config.clients:
        raise ConfigError(
            f"{len(order)} examples are too few for {config.test_examples} held out and "
            f"{config.clients} clients (lower the held-out count)"
        )
    return labels, examples.subset(order[config.test_examples :]), examples.subset(order[: config.test_examples])


def _shares(config: SimConfig, train: Examples) -> list[list[int]]:
    shares = partition(train, config.clients, PartitionSpec.parse(config.partition), seed=config.seed)
    if config.examples_per_client:
        shares = [share[: config.examples_per_client] for share in shares]
    return shares


def _split_shares(shares: list[list[int]], fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """Each share split into (training, held out): every k-th example held out, k = round(1 / fraction), so a
    client's held-out examples follow its own label mix; a share of one example holds none out."""
    step = max(2, round(1 / fraction))
    train = [[i for j, i in enumerate(share) if j % step or len(share) < 2] for share in shares]
    held = [[i for j, i in enumerate(share) if not j % step and len(share) >= 2] for share in shares]
    return train, held


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max())


LEGEND = """\
Columns (per strategy and round):
  acc, loss    held-out accuracy and mean cross-entropy of the pulled global model
  exact err    max |logit difference| on a probe set between the pulled global model and the
               weighted average of the round's client models (base + cumulative residual +
               Σ wᵢ sᵢ Bᵢ Aᵢ in float64, heads averaged, the weights the workers applied), or with
               --server-opt the optimiser's step on it (the global the clients started from plus
               the step on average − global, in float64 with the oracle's own state);
               about 1e-6 for exact strategies, large for fedavg
  remainder    largest relative size of the part of the global update beyond a client's LoRA rank
               (ranks below the global adapter's): kept frozen in the client's model and appended to
               its upload (exact), except for stack, whose rank would multiply: there it is dropped
               and the client starts from the best approximation at its rank
  up, down     bytes the round's clients uploaded, and pulled to start it (from the manifests); with
               --secure-aggregation up is the masked inputs (8 bytes an element of the trained factor and head)
  secs         wall time of the round: pulls, training, uploads, aggregation
  eps          largest cumulative client-side DP epsilon (with --dp-epsilon)
  pers acc     with --personal-heads: the mean over clients of each client's own model (the round's
               global body with its own head) on its own held-out examples (a fifth of its share,
               which it does not train on); acc is then the published model, whose head is round 0's
  cos          mean over the round's clients of the cosine between a client's update and the round's
               exact aggregate (over the whole adapter; low or negative: the clients pull apart); none with
               --secure-aggregation, where no worker sees one client's update
The centralised row trains one LoRA of the initial adapter's rank on every client's data
pooled, for the same total steps as the round's clients together (no DP). The best-alone row
(--alone) is the client that scored best on the held-out data after training alone on its own
data from the initial model for every round's local steps.
"""

_HEADER = (
    f"{'strategy':<12} {'round':>5} {'clients':>7} {'acc':>6} {'loss':>7} {'exact err':>9} {'remainder':>9} "
    f"{'up KiB':>8} {'down KiB':>8} {'secs':>6} {'eps':>6} {'pers acc':>8} {'cos':>6}"
)


def _format(row: SimRow) -> str:
    def opt(value: float | None, spec: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

    return (
        f"{row.strategy:<12} {row.round:>5} {row.clients:>7} {row.accuracy:>6.3f} {row.loss:>7.4f} "
        f"{opt(row.exact_error, '.2e', 9)} {opt(row.remainder, '.3f', 9)} {row.bytes_up / 1024:>8.0f} "
        f"{row.bytes_down / 1024:>8.0f} {row.seconds:>6.1f} {opt(row.epsilon, '.2f', 6)} "
        f"{opt(row.personal_accuracy, '.3f', 8)} {opt(row.cosine, '.3f', 6)}"
    )


def summary_table(rows: Sequence[SimRow], seeds: int) -> str:
    """Mean ± sd over the seeds of each strategy's held-out accuracy and loss, per round."""
    lines = [
        f"mean ± sd over {seeds} seeds:",
        f"{'strategy':<12} {'round':>5} {'acc':>15} {'loss':>17} {'cos':>6}",
    ]
    for s in summarise(rows):
        sd_acc, sd_loss = (f"{v:.3f}" if v is not None else "-" for v in (s.accuracy_sd, s.loss_sd))
        cos = "-" if s.cosine_mean is None else f"{s.cosine_mean:.3f}"
        lines.append(
            f"{s.strategy:<12} {s.round:>5} {s.accuracy_mean:>7.3f} ± {sd_acc:<5} {s.loss_mean:>8.4f} ± {sd_loss:<6} "
            f"{cos:>6}"
        )
    return "\n".join(lines)


def _title(config: SimConfig) -> str:
    ranks = "/".join(map(str, config.ranks)) if config.ranks else "global"
    return (
        f"{config.model} on {Path(config.dataset).name}: {config.clients} clients, {config.partition}, "
        f"fraction {config.fraction_fit:g}, ranks {ranks}"
    )
