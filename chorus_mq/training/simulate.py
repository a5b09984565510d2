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

import csv
import json
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError
from chorus_mq.local import LocalState
from chorus_mq.names import (
    CENTRALISED,
    ExpirePolicy,
    LabelBalance,
    LocalOptimizer,
    RoundStatus,
    ServerOptimizer,
    Strategy,
    TaskType,
)

from .data import Examples, embedded_data, load_examples, resolve_model
from .dp import DPConfig, PrivacyLedger
from .local import Evaluation, TrainConfig, evaluate, predict, save_adapter, should_balance, train_local
from .partition import PartitionSpec, partition

if TYPE_CHECKING:
    import torch

    from chorus_mq.client import ChorusClient
    from chorus_mq.state import FederationConfig

_PROBE = 64
#: the deadline of a sampled round (seconds): every drawn client of a simulation uploads well before it
_SAMPLED_ROUND_TIMEOUT = 3600


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


@dataclass(frozen=True)
class SimConfig:
    """Everything a model simulation depends on (written next to the results)."""

    model: str
    dataset: str
    clients: int
    rounds: int
    partition: str
    fraction_fit: float
    ranks: tuple[int, ...] | None
    strategies: tuple[str, ...]
    centralised: bool
    dp_epsilon: float | None
    steps_per_round: int
    batch_size: int
    lr: float
    max_length: int
    test_examples: int
    examples_per_client: int | None
    seed: int
    text_column: str = "text"
    label_column: str = "label"
    optimizer: str = "adamw"
    #: auto | on | off, decided per client as ``train`` does (see ``local.should_balance``)
    balance_labels: str = "auto"
    #: FedProx weight of every federation (``federation create --prox-mu``)
    prox_mu: float = 0.0
    #: the server optimiser of every federation and its step size (``federation create --server-opt``)
    server_opt: str = "none"
    server_lr: float = 1.0

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

    @property
    def name(self) -> str:
        return f"client-{self.index}"

    ledger: PrivacyLedger | None = None


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
    model: str = "minilm",
    dataset: str = "rotten-tomatoes",
    clients: int = 3,
    rounds: int = 2,
    partition: str = "iid",
    fraction_fit: float = 1.0,
    ranks: Sequence[int] | None = None,
    strategies: Sequence[str] = ("fedex-lora",),
    centralised: bool = False,
    dp_epsilon: float | None = None,
    steps_per_round: int | None = None,
    batch_size: int = 16,
    lr: float = 3e-3,
    max_length: int = 64,
    test_examples: int = 300,
    examples_per_client: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    optimizer: str = "adamw",
    balance_labels: str = "auto",
    prox_mu: float = 0.0,
    server_opt: str = "none",
    server_lr: float = 1.0,
    out_dir: Path | None = None,
    seed: int = 0,
    sdk_factory: Callable[[Path], ChorusClient] | None = None,
    redis_url: str | None = None,
    store_url: str | None = None,
    as_json: bool = False,
    echo: Callable[[str], None] | None = print,
) -> list[SimRow]:
    """Run one federation per strategy (plus the centralised baseline); return every row."""
    import torch

    config = SimConfig(
        model=model,
        dataset=dataset,
        clients=clients,
        rounds=rounds,
        partition=partition,
        fraction_fit=fraction_fit,
        ranks=tuple(ranks) if ranks else None,
        strategies=tuple(str(Strategy(s)) for s in strategies),
        centralised=centralised,
        dp_epsilon=dp_epsilon,
        steps_per_round=steps_per_round or 10,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
        test_examples=test_examples,
        examples_per_client=examples_per_client,
        seed=seed,
        text_column=text_column,
        label_column=label_column,
        optimizer=str(LocalOptimizer(optimizer)),
        balance_labels=str(LabelBalance(balance_labels)),
        prox_mu=prox_mu,
        server_opt=server_opt,
        server_lr=server_lr,
    )
    _check(config)
    show = None if as_json else echo
    workdir = Path(tempfile.mkdtemp(prefix="chorus-sim-model-"))
    threads = torch.get_num_threads()
    owned = sdk_factory is None
    try:
        torch.set_num_threads(1)  # the eager workers aggregate on their own threads; one each avoids oversubscribing
        sdk = (sdk_factory or _default_factory(redis_url, store_url))(workdir)
        runner = _Runner(config, sdk, workdir, show)
        rows = runner.run()
        if out_dir is not None:
            write_results(Path(out_dir), config, rows)
            if show:
                show(f"wrote {Path(out_dir) / 'results.csv'}, results.json and accuracy.png")
        if as_json and echo:
            echo(json.dumps([asdict(r) for r in rows], indent=2))
        return rows
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
    for strategy in config.strategies:  # refused before any training, as federation create would refuse it
        _federation_config(config, "check", strategy, "check", ())


def _default_factory(redis_url: str | None, store_url: str | None) -> Callable[[Path], ChorusClient]:
    from chorus_mq.simulate import embedded_sdk

    def factory(workdir: Path) -> ChorusClient:
        return embedded_sdk(workdir, redis_url=redis_url, store_url=store_url)

    return factory


class _Runner:
    def __init__(self, config: SimConfig, sdk: ChorusClient, workdir: Path, echo: Callable[[str], None] | None):
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
        start = self._evaluate(exact_model(initial, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels))
        self._say(_HEADER)
        rows: list[SimRow] = []
        for strategy in self.config.strategies:
            rows.append(SimRow(strategy, 0, 0, start.accuracy, start.loss))
            self._say(_format(rows[-1]))
            federation = self._create(strategy, initial)
            for r in range(1, self.config.rounds + 1):
                rows.append(self._round(federation, r))
                self._say(_format(rows[-1]))
        if self.config.centralised:
            rows.extend(self._centralised(initial, start))
        self._say(LEGEND)
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
        self.sdk.create_federation(fed_config, model=model_decl_from_adapter(initial), initial_adapter=initial)
        parties = []
        for i, idx in enumerate(self.shares):
            rank = cfg.ranks[i % len(cfg.ranks)] if cfg.ranks else cfg.initial_rank
            client = _Client(i, self.train.subset(idx), rank)
            client.secret = self.sdk.add_client(name, client.name).secret
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
        from .model import corrected_base, exact_model, read_adapter, start_model

        started = time.perf_counter()
        start, chosen = self._selected(fed, r)
        updates: list[tuple[str, Path]] = []
        up = down = 0
        worst_remainder = 0.0
        epsilon: float | None = None
        for client in chosen:
            pulled = client.workdir / "pulled"
            down += self._pull(fed, client, pulled, start)
            start_point = start_model(
                pulled,
                self.model_dir,
                task=TaskType.SEQ_CLS,
                rank=client.rank,
                alpha=2.0 * client.rank,
                labels=self.labels,
                seed=self.config.seed * 7919 + r,
                keep_remainder=fed.strategy != Strategy.STACK,
            )
            model = start_point.model
            worst_remainder = max(worst_remainder, start_point.gap.relative)
            train = self._train_config(self.config.seed * 7919 + r * 101 + client.index, client.examples)
            privacy, report = None, None
            if client.ledger is not None:
                report = client.ledger.report(r, train.planned_steps(len(client.examples)))
                privacy = (client.ledger.noise_multiplier, client.ledger.config.clip)
            train_local(model, self.tokenizer, client.examples, train, privacy=privacy)
            adapter = save_adapter(
                model, client.workdir / f"round-{r}", base_model=self.model_dir.name, remainder=start_point.remainder
            )
            if client.ledger is not None and report is not None:
                client.ledger.commit(r, train.planned_steps(len(client.examples)))
                epsilon = max(epsilon or 0.0, report.epsilon)
            result = self.sdk.upload(
                fed.name,
                adapter,
                client.name,
                dataset_size=float(len(client.examples)),
                round_=r,
                secret=client.secret,
                dp=None if report is None else report.to_dict(),
            )
            up += result.bytes
            updates.append((client.name, adapter))
        summary = self.sdk.wait_round(fed.name, r, timeout=600)
        if summary.state != RoundStatus.COMPLETE:
            raise ConfigError(f"{fed.name} round {r} ended {summary.state}: {summary.reason}")
        previous = corrected_base(fed.server_view, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels)
        started_from = read_adapter(fed.server_view)  # the global this round's clients trained from
        manifest = self.sdk.pull(fed.name, fed.server_view, r)
        fed.increments[r] = (manifest.adapter_bytes, manifest.residual_bytes)
        seconds = time.perf_counter() - started
        weights = {c.client_id: float(c.weight) for c in manifest.clients}
        total, heads = weighted_updates([(weights[name], adapter) for name, adapter in updates])
        if self.config.server_opt != ServerOptimizer.NONE:
            total, heads = self._server_step(fed, started_from, total, heads)
        oracle = apply_updates(previous, total, heads)
        pulled_model = exact_model(fed.server_view, self.model_dir, task=TaskType.SEQ_CLS, labels=self.labels)
        error = _max_error(self._logits(pulled_model), self._logits(oracle))
        score = self._evaluate(pulled_model)
        return SimRow(
            fed.strategy, r, len(chosen), score.accuracy, score.loss, error, worst_remainder, up, down, seconds, epsilon
        )

    def _server_step(
        self, fed: _Federation, started_from: Any, total: dict[str, Any], heads: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The oracle of a round under a server optimiser: each module's update is the published adapter the
        clients started from plus the optimiser's step on (exact average − that adapter), in float64 with
        the oracle's own state; each head the previous head plus its step (the average as it is when the
        previous global had none)."""
        import torch

        from chorus_mq.aggregation.server_opt import ServerOptConfig, step

        cfg = ServerOptConfig(ServerOptimizer(self.config.server_opt), lr=self.config.server_lr)
        factors, old_heads, _targets = started_from
        stepped, stepped_heads = {}, {}
        for module, update in total.items():
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
        rows = [SimRow(CENTRALISED, 0, 0, start.accuracy, start.loss)]
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
            rows.append(SimRow(CENTRALISED, r, 1, score.accuracy, score.loss, seconds=seconds))
            self._say(_format(rows[-1]))
        return rows


def weighted_average(base: Any, clients: Sequence[tuple[float, Path]]) -> Any:
    """``base`` plus Σ wᵢ sᵢ Bᵢ Aᵢ (float64 sum) on each LoRA module and the heads averaged: the exact
    weighted average of client models that all started from ``base`` (modified in place and returned)."""
    return apply_updates(base, *weighted_updates(clients))


def weighted_updates(clients: Sequence[tuple[float, Path]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per module Σ wᵢ sᵢ Bᵢ Aᵢ and per head Σ wᵢ hᵢ of the saved client adapters, in float64."""
    from .model import read_adapter

    total: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    for weight, adapter in clients:
        factors, head, _targets = read_adapter(adapter)
        for module, (A, B, scaling) in factors.items():
            update = weight * scaling * (B.double() @ A.double())
            total[module] = total[module] + update if module in total else update
        for key, tensor in head.items():
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
        server_opt=ServerOptimizer(config.server_opt),
        server_lr=config.server_lr,
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
  up, down     bytes the round's clients uploaded, and pulled to start it (from the manifests)
  secs         wall time of the round: pulls, training, uploads, aggregation
  eps          largest cumulative client-side DP epsilon (with --dp-epsilon)
The centralised row trains one LoRA of the initial adapter's rank on every client's data
pooled, for the same total steps as the round's clients together (no DP).
"""

_HEADER = (
    f"{'strategy':<12} {'round':>5} {'clients':>7} {'acc':>6} {'loss':>7} {'exact err':>9} {'remainder':>9} "
    f"{'up KiB':>8} {'down KiB':>8} {'secs':>6} {'eps':>6}"
)


def _format(row: SimRow) -> str:
    def opt(value: float | None, spec: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

    return (
        f"{row.strategy:<12} {row.round:>5} {row.clients:>7} {row.accuracy:>6.3f} {row.loss:>7.4f} "
        f"{opt(row.exact_error, '.2e', 9)} {opt(row.remainder, '.3f', 9)} {row.bytes_up / 1024:>8.0f} "
        f"{row.bytes_down / 1024:>8.0f} {row.seconds:>6.1f} {opt(row.epsilon, '.2f', 6)}"
    )


def write_results(out: Path, config: SimConfig, rows: list[SimRow]) -> None:
    """``results.csv``, ``results.json`` (config + rows) and ``accuracy.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in SimRow.__dataclass_fields__.values()]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    plot_accuracy(rows, out / "accuracy.png", title=_title(config))


def _title(config: SimConfig) -> str:
    ranks = "/".join(map(str, config.ranks)) if config.ranks else "global"
    return (
        f"{config.model} on {Path(config.dataset).name}: {config.clients} clients, {config.partition}, "
        f"fraction {config.fraction_fit:g}, ranks {ranks}"
    )


def plot_accuracy(rows: list[SimRow], path: Path, *, title: str = "") -> None:
    """Held-out accuracy per round, one line per strategy; the centralised baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in dict.fromkeys(r.strategy for r in rows):
        mine = [r for r in rows if r.strategy == strategy]
        style: dict[str, Any] = {"linestyle": "--", "color": "black"} if strategy == CENTRALISED else {"marker": "o"}
        ax.plot([r.round for r in mine], [r.accuracy for r in mine], label=strategy, **style)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
