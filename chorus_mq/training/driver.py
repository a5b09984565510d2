"""``chorus-mq train``: one client's side of a whole federation, round after round, restartable.

Each round: wait for an open round this client may upload to, pull the latest complete round
into the work dir (increments only), build the exact global model, train LoRA locally, upload
with the dataset size (and the DP spend), wait for the verdict and the round's end, evaluate,
and yield a :class:`RoundRecord`.

The work dir makes a restart safe: the adapter trained for a round is kept there before it is
uploaded, so a client killed after training re-uploads the same bytes (the workers answer
``duplicate``, and nothing is counted twice); rounds already taken part in are recorded there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, NotSelected, Rejected, RoundClosed, Timeout
from chorus_mq.names import (
    CLIENT_VARIATE_FILE,
    DEFAULT_LOCAL_LR,
    ENDED_STATES,
    PRIVACY_FILE,
    PULLED_DIR,
    SKEWED_LABELS,
    TRAIN_STATE_FILE,
    TRAIN_STATE_FORMAT,
    FederationMode,
    LabelBalance,
    LocalOptimizer,
    RoundStatus,
    TaskType,
)
from chorus_mq.strategy import strategy_spec

from .data import Examples, load_examples
from .dp import DPConfig, PrivacyLedger
from .heads import PersonalHead, head_path
from .local_round import Evaluation, TrainConfig, evaluate, label_skew, save_adapter, should_balance, train_local
from .records import ROUND_HEAD_FILE, RoundRecord, Trained, write_json

if TYPE_CHECKING:
    from chorus_mq.sdk.participant import ParticipantSdk
    from chorus_mq.sdk.summaries import RoundSummary, Status, UploadResult

#: one line per phase (training, uploading, waiting, evaluating); ``train`` prints them on stderr
log = logging.getLogger(__name__)
#: how long ``upload`` waits for a verdict when ``timeout`` is None
_VERDICT_WAIT_S = 300.0


@dataclass
class WorkState:
    """``train_state.json``: whose work dir this is and which rounds it has finished."""

    path: Path
    federation: str
    client_id: str
    done: list[int] = field(default_factory=list)  # rounds taken part in that ended complete
    #: this client's latest evaluation of a global model (round, loss, accuracy, examples): reported with
    #: the next upload that starts from that round
    last_eval: dict[str, Any] | None = None

    @classmethod
    def open(cls, workdir: Path, federation: str, client_id: str) -> WorkState:
        path = workdir / TRAIN_STATE_FILE
        if path.exists():
            raw = json.loads(path.read_text())
            if raw.get("format") != TRAIN_STATE_FORMAT:
                raise ConfigError(f"{path} is not a chorus-mq train work dir ({TRAIN_STATE_FORMAT})")
            if (raw["federation"], raw["client_id"]) != (federation, client_id):
                raise ConfigError(
                    f"work dir {workdir} belongs to client {raw['client_id']!r} of federation "
                    f"{raw['federation']!r}: give each client its own --workdir"
                )
            return cls(path, federation, client_id, [int(r) for r in raw["done"]], raw.get("last_eval"))
        workdir.mkdir(parents=True, exist_ok=True)
        state = cls(path, federation, client_id)
        state.save()
        return state

    def finish(self, round_: int) -> None:
        if round_ not in self.done:
            self.done.append(round_)
            self.save()

    def remember_eval(self, round_: int, score: Evaluation) -> None:
        self.last_eval = {"round": round_, "loss": score.loss, "accuracy": score.accuracy, "examples": score.examples}
        self.save()

    def eval_of(self, round_: int | None) -> dict[str, Any] | None:
        """The evaluation of round ``round_``'s global model, when this client made it."""
        if round_ is None or self.last_eval is None or self.last_eval.get("round") != round_:
            return None
        return self.last_eval

    def save(self) -> None:
        raw = {
            "format": TRAIN_STATE_FORMAT,
            "federation": self.federation,
            "client_id": self.client_id,
            "done": sorted(self.done),
            "last_eval": self.last_eval,
        }
        write_json(self.path, raw)


@dataclass(frozen=True)
class TrainJob:
    """One ``train`` run, as ``chorus-mq train`` (or the SDK) asks for it: built once, passed down."""

    federation: str
    client_id: str
    model_dir: str | Path | None
    data: str | Path | Examples
    workdir: str | Path
    rounds: int = 1
    text_column: str | None = None
    label_column: str | None = None
    task: TaskType | str | None = None
    steps_per_round: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    lr: float = DEFAULT_LOCAL_LR
    max_length: int = 128
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: Sequence[str] | None = None
    eval_data: str | Path | Examples | None = None
    dp: DPConfig | None = None
    optimizer: str = "adamw"
    balance_labels: LabelBalance | str = LabelBalance.AUTO
    prox_mu: float | None = None
    share_stats: bool | None = None
    seed: int = 0
    json: bool = False
    progress: bool = True
    timeout: float | None = None
    poll: float = 0.5
    dp_seed: int | None = None

    def train_config(self, task: TaskType, balance: bool, federation_prox_mu: float) -> TrainConfig:
        """The local training every round runs (``prox_mu`` None: the federation's)."""
        return TrainConfig(
            task=task,
            steps=self.steps_per_round,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_length=self.max_length,
            seed=self.seed,
            progress=self.progress and not self.json,
            optimizer=LocalOptimizer(self.optimizer),
            balance_labels=balance,
            prox_mu=federation_prox_mu if self.prox_mu is None else self.prox_mu,
        )


def train_federation(sdk: ParticipantSdk, **options: Any) -> Iterator[RoundRecord]:
    """:func:`run_train_job` with the job's fields as keywords (the SDK's ``train``, tests)."""
    return run_train_job(sdk, TrainJob(**options))


def run_train_job(sdk: ParticipantSdk, job: TrainJob) -> Iterator[RoundRecord]:
    """Take part in ``job.rounds`` complete rounds of ``job.federation`` as ``job.client_id``; yield a record
    per round.

    ``job.lora_rank`` None trains the global adapter at its own rank; a rank below it trains its top
    directions and keeps the rest frozen, uploaded with the update, so the start is exact too (stack
    federations drop the rest instead: their rank would multiply; see ``model.start_model``).
    ``job.timeout`` bounds each wait (for a round to open or to end); None waits as long as it takes.
    ``job.share_stats`` sends the label counts of ``job.data`` and this client's evaluation of the global model it
    starts from (made after the previous round, with ``job.eval_data``) with each upload; None: unless under DP,
    whose guarantee does not cover them.
    """

    if job.rounds < 1:
        raise ConfigError(f"--rounds must be positive, got {job.rounds}")
    sdk.check_identity(job.federation, job.client_id)  # a wrong secret or URL fails now, not after a round of training
    work = Path(job.workdir)
    state = WorkState.open(work, job.federation, job.client_id)
    status = sdk.status(job.federation)
    session = _open_session(sdk, job, status, work)
    if status.mode == FederationMode.BUFFERED.value:
        yield from _run_buffered(sdk, job, session)
        return
    rounds = _Rounds(sdk, job, state, session)
    while _reconcile(sdk, job.federation, job.client_id, state, session) < job.rounds:
        record = rounds.take_part()
        if record is not None:
            yield record


def _open_session(sdk: ParticipantSdk, job: TrainJob, status: Status, work: Path) -> _Session:
    """What stays fixed over the run, from the job and the federation's status: the model, the task and its labels,
    the data, the local training (checked against the federation's strategy) and the DP ledger."""
    from .data import model_of_federation
    from .model import load_tokenizer

    model_path = model_of_federation(job.model_dir, status.base_model)
    if job.model_dir is None:
        log.info("model: the federation's base model %s (%s)", status.base_model, model_path)
    task_type, labels = _task_and_labels(job, status)
    examples = _examples(job.data, job.text_column, job.label_column, labels)
    evaluation = None if job.eval_data is None else _examples(job.eval_data, job.text_column, job.label_column, labels)
    balance = _balance(job.balance_labels, examples, labels, task_type, private=job.dp is not None)
    config = job.train_config(task_type, balance, status.prox_mu)
    _check_strategy(job, status, config)
    personal = bool(status.personal_heads) and task_type == TaskType.SEQ_CLS
    if personal:
        log.info("personal heads: this client keeps its own task head in %s (never uploaded)", head_path(work))
    ledger = None
    if job.dp is not None:
        ledger = PrivacyLedger.open(
            work / PRIVACY_FILE,
            job.dp,
            sample_rate=config.sample_rate(len(examples)),
            planned_steps=job.rounds * config.planned_steps(len(examples)),
        )
    return _Session(
        sdk,
        job.federation,
        model_path,
        work,
        examples,
        evaluation,
        load_tokenizer(model_path),
        config,
        labels,
        ledger,
        job.lora_rank,
        job.lora_alpha,
        tuple(job.target_modules) if job.target_modules else None,
        job.dp_seed,
        keep_remainder=strategy_spec(status.strategy).keeps_remainder,
        scaffold=status.scaffold,
        strategy=str(status.strategy),
        client_id=job.client_id,
        personal_heads=personal,
    )


def _task_and_labels(job: TrainJob, status: Status) -> tuple[TaskType, tuple[str, ...] | None]:
    """The task this client trains (the federation's) and, for seq-cls, the labels its head maps onto."""
    task_type = _task(job.task, status.task_type)
    labels = tuple(status.labels) if task_type == TaskType.SEQ_CLS else None
    if task_type == TaskType.SEQ_CLS and not labels:
        raise ConfigError(
            f"federation {job.federation!r} declares no labels: a seq-cls client cannot map its data "
            "onto the head (the operator creates it with --labels)"
        )
    return task_type, labels


def _check_strategy(job: TrainJob, status: Status, config: TrainConfig) -> None:
    """Refuse a local rank or alpha the federation's strategy cannot take; say how it shapes local training."""
    if config.prox_mu:
        log.info("FedProx: pulled toward each round's global model with mu %g", config.prox_mu)
    if status.scaffold:
        if job.lora_rank is not None or job.lora_alpha is not None:
            raise ConfigError(
                f"federation {job.federation!r} uses SCAFFOLD, whose variates live on the global adapter's tensors: "
                "train at its own rank and alpha (drop --lora-rank / --lora-alpha)"
            )
        log.info("SCAFFOLD: local steps corrected by the server's and this client's control variates")
    spec = strategy_spec(status.strategy)
    if spec.frozen_shared:
        if job.lora_rank is not None or job.lora_alpha is not None:
            raise ConfigError(
                f"federation {job.federation!r} uses {spec.name}, whose clients keep a published factor frozen: "
                "train at the global adapter's own rank and alpha (drop --lora-rank / --lora-alpha)"
            )
        if spec.sandwich:
            log.info("%s: each round trains lora_R between the published frame (B, A frozen)", spec.name)
        else:
            log.info("%s: each round trains one factor (%s), the other stays frozen", spec.name, status.trainable)


def _run_buffered(sdk: ParticipantSdk, job: TrainJob, session: _Session) -> Iterator[RoundRecord]:
    """A buffered federation has no rounds to wait for: one contribution after another (``buffered_loop``)."""
    from .buffered_loop import run_buffered

    return run_buffered(
        sdk,
        job.federation,
        job.client_id,
        session,
        job.rounds,
        timeout=job.timeout,
        poll=job.poll,
        verdict_wait=_VERDICT_WAIT_S if job.timeout is None else job.timeout,
    )


class _Rounds:
    """The synchronous rounds of one ``train`` run, a method per phase of a round."""

    def __init__(self, sdk: ParticipantSdk, job: TrainJob, state: WorkState, session: _Session):
        self.sdk = sdk
        self.job = job
        self.state = state
        self.session = session
        self.share = job.dp is None if job.share_stats is None else job.share_stats
        self.label_counts = _label_counts(session.examples, session.labels) if self.share else None

    def take_part(self) -> RoundRecord | None:
        """Wait to be drawn, train, upload and wait for the verdict and the round's end, evaluate, report; None
        where this client sits the round out (not drawn, or the round moved on while it trained)."""
        started = time.monotonic()
        status = self.wait_until_drawn()
        if status is None:
            return None
        r, start = status.current_round, status.latest_complete
        trained = self.train(r, start)
        result = self.upload(r, start, trained)
        if result is None:
            return None
        log.info("round %d: %s; %s", r, result.status, _waiting(self.sdk, self.job.federation, r))
        summary = self.sdk.wait_round(self.job.federation, r, timeout=self.job.timeout)
        score = self.conclude(r, summary)
        return RoundRecord(
            r,
            str(summary.state),
            result.status,
            start,
            trained.loss,
            None if score is None else score.accuracy,
            None if score is None else score.loss,
            result.bytes,
            time.monotonic() - started,
            trained.steps,
            trained.examples,
            None if trained.dp is None else trained.dp.epsilon,
        )

    def wait_until_drawn(self) -> Status | None:
        """The status of the next open round this client may upload to; None (after that round) where not drawn."""
        job = self.job
        status = _wait_for_open_round(self.sdk, job.federation, self.state, timeout=job.timeout, poll=job.poll)
        r = status.current_round
        if status.selected and job.client_id not in status.selected:
            log.info("round %d: not drawn (selected: %s); waiting for the next round", r, ", ".join(status.selected))
            self.sdk.wait_round(job.federation, r, timeout=job.timeout)  # not drawn this round: wait for the next
            return None
        return status

    def train(self, r: int, start: int | None) -> Trained:
        """Round ``r``'s adapter trained from round ``start``: the one kept before a restart where it still fits."""
        session = self.session
        trained = Trained.load(session.round_dir(r))
        if trained is None or trained.start_round != start or (session.scaffold and trained.lr_sum is None):
            log.info(
                "round %d: training %d steps on %d examples from %s",
                r,
                session.config.planned_steps(len(session.examples)),
                len(session.examples),
                "the initial adapter" if start is None else f"round {start}'s global model",
            )
            return session.train(r, start)
        log.info("round %d: re-uploading the adapter trained before a restart", r)
        return trained

    def upload(self, r: int, start: int | None, trained: Trained) -> UploadResult | None:
        """Upload round ``r``'s adapter and wait for the verdict; None where the round was not this client's
        to upload to after all (not drawn, or closed while it trained)."""
        job, session = self.job, self.session
        if session.ledger is not None:
            # counted before the upload: once the bytes are in the store they are released, whatever the
            # verdict; a re-upload of the same round replaces its entry (no double counting)
            session.ledger.commit(r, trained.steps)
        log.info("round %d: uploading (local loss %.4f)", r, trained.loss)
        try:
            return self.sdk.upload(
                job.federation,
                trained.adapter,
                job.client_id,
                dataset_size=float(trained.examples),
                round_=r,
                dp=trained.dp.to_dict() if trained.dp else None,
                label_counts=self.label_counts,
                global_eval=self.state.eval_of(start) if self.share else None,
                progress=session.config.progress,
                timeout=_VERDICT_WAIT_S if job.timeout is None else job.timeout,
                lr_sum=trained.lr_sum,
                secure_state_dir=session.work / "secagg",  # a secure round's keys: a restarted train resumes its phases
                on_phase=lambda r, phase: log.info("round %d: secure aggregation, phase %s", r, phase),
            )
        except Rejected as exc:
            if exc.code == NotSelected.code:
                self.sdk.wait_round(job.federation, r, timeout=job.timeout)
                return None
            if exc.code == RoundClosed.code:
                log.info("round %d closed while this client trained: training for the next one", r)
                return None  # the round moved on while this client trained: train again for the current one
            raise

    def conclude(self, r: int, summary: RoundSummary) -> Evaluation | None:
        """Round ``r`` ended: where it completed, adopt this client's head, evaluate the new global model, keep
        the SCAFFOLD variate, record the round as done and prune the work dir; the evaluation, if any."""
        if summary.state != RoundStatus.COMPLETE:
            return None
        session, work = self.session, self.session.work
        session.adopt_head(r)  # before the round is recorded as done: a restart adopts it again
        if session.evaluation is not None:
            what = "the global body with this client's own head" if session.personal_heads else "the global model"
            log.info("round %d: complete; evaluating %s on %d examples", r, what, len(session.evaluation))
        score = session.evaluate(r)
        if self.job.client_id in summary.clients:
            _keep_variate(work, r)
        if score is not None:
            self.state.remember_eval(r, score)
        self.state.finish(r)
        _prune(work, keep=r)
        return score


@dataclass
class _Session:
    """What stays fixed over one ``train`` run: the client's data, model, settings and ledger."""

    sdk: ParticipantSdk
    federation: str
    model_dir: Path
    work: Path
    examples: Examples
    evaluation: Examples | None
    tokenizer: Any
    config: TrainConfig
    labels: tuple[str, ...] | None
    ledger: PrivacyLedger | None
    lora_rank: int | None
    lora_alpha: float | None
    target_modules: tuple[str, ...] | None
    dp_seed: int | None
    #: stack's global rank is the sum of its uploads': a client below it drops the remainder (see start_model)
    keep_remainder: bool = True
    #: SCAFFOLD: correct each step by the control variates, and keep this client's own (see .scaffold)
    scaffold: bool = False
    #: the federation's strategy: one that freezes a shared factor trains only the round's trainable one
    strategy: str = "fedex-lora"
    client_id: str = ""
    #: ``--personal-heads``: train on this client's own head, upload the body only, keep the head here
    personal_heads: bool = False

    @property
    def pulled(self) -> Path:
        return self.work / PULLED_DIR

    def round_dir(self, r: int) -> Path:
        return self.work / "rounds" / f"{r:06d}"

    @property
    def own_variate(self) -> Path:
        return self.work / CLIENT_VARIATE_FILE

    def train(self, r: int, start: int | None) -> Trained:
        """Train round ``r`` from the global model of round ``start``; keep the adapter in the round's dir."""
        from .model import start_model

        if start is not None:
            self.sdk.pull(self.federation, self.pulled, start, progress=self.config.progress)
        steps = self.config.planned_steps(len(self.examples))
        ledger = self.ledger
        report = ledger.report(r, steps) if ledger is not None else None  # refuses before training if over budget
        start_point = start_model(
            self.pulled if start is not None else None,
            self.model_dir,
            task=self.config.task,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            labels=self.labels,
            target_modules=self.target_modules,
            seed=self.config.seed + r,
            keep_remainder=self.keep_remainder,
        )
        model = start_point.model
        frozen = strategy_spec(self.strategy).frozen(r)
        if frozen is not None:
            from .model import freeze_factor

            freeze_factor(model, frozen)  # uploaded as published, bit for bit (ingest checks)
        attached = None
        if strategy_spec(self.strategy).sandwich:  # Fed-SB: lora_B = B_frozen @ R, R trains, A frozen
            from .sandwich import attach_r

            attached = attach_r(model, self.pulled)
        own = self.own_head()
        if own is not None:
            from .heads import apply_head

            apply_head(model, own.tensors)  # the global body, this client's head
        round_config = TrainConfig(**{**asdict(self.config), "seed": self.config.seed + r})
        privacy = (ledger.noise_multiplier, ledger.config.clip) if ledger is not None else None
        variates = None
        if self.scaffold:
            from .scaffold import ScaffoldRound

            variates = ScaffoldRound.begin(model, self.pulled if start is not None else None, self.own_variate)
        result = train_local(
            model,
            self.tokenizer,
            self.examples,
            round_config,
            privacy=privacy,
            dp_seed=self.dp_seed,
            correction=None if variates is None else variates.correction(),
        )
        round_dir = self.round_dir(r)
        if round_dir.exists():
            shutil.rmtree(round_dir)
        staging = round_dir.with_name(round_dir.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        trained_r = attached.finish() if attached is not None else None
        save_adapter(model, staging / "adapter", base_model=self.model_dir.name, remainder=start_point.remainder)
        if trained_r is not None:
            from .sandwich import write_r_upload

            write_r_upload(staging / "adapter", trained_r)  # the upload: lora_R per module and the head
        lr_sum = None
        if variates is not None:
            from .scaffold import save_variate

            lr_sum = result.steps * round_config.lr
            # kept as this client's own once the round completes with its update in it (_keep_variate)
            save_variate(staging / CLIENT_VARIATE_FILE, variates.finish(model, lr_sum), variates.basis(), r)
        trained = Trained(r, start, round_dir / "adapter", result.loss, result.steps, result.examples, report, lr_sum)
        if self.personal_heads:
            from .heads import split_head

            head = split_head(staging / "adapter")  # the upload carries the body only
            PersonalHead(head, self.federation, self.client_id, r).save(staging / ROUND_HEAD_FILE)
        trained.save(staging)
        os.replace(staging, round_dir)  # the round's adapter appears whole or not at all
        return trained

    def own_head(self) -> PersonalHead | None:
        """This client's head (``--personal-heads``), None before its first complete round (or otherwise)."""
        path = head_path(self.work)
        if not self.personal_heads or not path.exists():
            return None
        return PersonalHead.load(path)

    def adopt_head(self, r: int) -> None:
        """Round ``r`` completed: the head this client trained in it becomes its own (kept across rounds)."""
        if not self.personal_heads:
            return
        trained = self.round_dir(r) / ROUND_HEAD_FILE
        current = self.own_head()
        if not trained.exists() or (current is not None and current.round >= r):
            return
        PersonalHead.load(trained).save(head_path(self.work))
        log.info("round %d: this client's own head is now the one it trained in round %d", r, r)

    def evaluate(self, r: int) -> Evaluation | None:
        """Round ``r``'s exact global model on the evaluation data (None without ``--eval-data``); with
        personal heads, round ``r``'s body and this client's own head (the model it trains on next)."""
        from .model import exact_model

        if self.evaluation is None:
            return None
        self.sdk.pull(self.federation, self.pulled, r, progress=self.config.progress)
        model = exact_model(self.pulled, self.model_dir, task=self.config.task, labels=self.labels)
        own = self.own_head()
        if own is not None:
            from .heads import apply_head

            apply_head(model, own.tensors)
        return evaluate(
            model, self.tokenizer, self.evaluation, task=self.config.task, max_length=self.config.max_length
        )


def _balance(
    option: LabelBalance | str, examples: Examples, labels: tuple[str, ...] | None, task: TaskType, *, private: bool
) -> bool:
    """Whether to balance this client's labels, saying so when its labels are skewed."""
    balance = should_balance(option, examples, len(labels or ()), task, private=private)
    if task == TaskType.SEQ_CLS and examples.labels is not None and labels:
        skew = label_skew(examples.labels, len(labels))
        counts = ", ".join(f"{name} {examples.labels.count(i)}" for i, name in enumerate(labels))
        if skew >= SKEWED_LABELS:
            what = "balancing them (logit adjustment)" if balance else "not balancing them"
            why = " under DP-SGD: the counts are not private" if private and not balance else ""
            log.warning("this client's labels are skewed (%s; %.2f from uniform): %s%s", counts, skew, what, why)
    return balance


def _label_counts(examples: Examples, labels: tuple[str, ...] | None) -> dict[str, int] | None:
    """Examples per declared label (zeros included), as this client declares them with its uploads."""
    if not labels or examples.labels is None:
        return None
    return {name: examples.labels.count(i) for i, name in enumerate(labels)}


def _waiting(sdk: ParticipantSdk, federation: str, r: int) -> str:
    """What round ``r`` waits for: ``k/n`` deltas and, where the round drew its clients, who is missing."""
    status = sdk.status(federation)
    if status.current_round != r or status.state != RoundStatus.OPEN:
        return f"round is {status.state if status.current_round == r else 'over'}"
    line = f"waiting for quorum ({status.deltas}/{status.quorum} deltas)"
    if status.selected:
        sent = set(sdk.round(federation, r).clients)
        missing = [c for c in status.selected if c not in sent]
        if missing:
            line += f", missing: {', '.join(missing)}"
    return line


def _task(option: TaskType | str | None, declared: str | None) -> TaskType:
    if option is None and declared is None:
        raise ConfigError("the federation declares no task: pass --task seq-cls or --task causal-lm")
    task = TaskType(option or declared)
    if declared is not None and TaskType(declared) != task:
        raise ConfigError(f"--task {task} differs from the federation's task {declared}")
    return task


def _examples(
    data: str | Path | Examples, text_column: str | None, label_column: str | None, labels: tuple[str, ...] | None
) -> Examples:
    if isinstance(data, Examples):
        return data
    return load_examples(data, text_column=text_column, label_column=label_column, labels=labels)


def _wait_for_open_round(
    sdk: ParticipantSdk, federation: str, state: WorkState, *, timeout: float | None, poll: float
) -> Status:
    """The status once the current round is open and not one this client already finished."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # a poll reads the current round only; the full status (history, privacy) once it is open
        r = sdk.state.current_round(federation)
        round_state = sdk.state.round(federation, r).state
        if round_state == RoundStatus.OPEN and r not in state.done:
            status = sdk.status(federation)
            if status.state == RoundStatus.OPEN and status.current_round not in state.done:
                return status
            continue  # it moved on between the two reads: look again
        if round_state not in ENDED_STATES and r not in state.done:
            sdk.wait_round(federation, r, timeout=timeout)  # aggregating: wait for it to end
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise Timeout(f"no round of {federation!r} after round {r} opened within {timeout:.0f}s")
        time.sleep(poll)  # ended: the workers open the next round


def _reconcile(sdk: ParticipantSdk, federation: str, client_id: str, state: WorkState, session: _Session) -> int:
    """Mark rounds this client uploaded to that completed unrecorded (it was killed, or restarted while the
    round aggregated), adopting the head it trained there; return how many rounds it has finished."""
    from chorus_mq.errors import NotFound

    rounds = session.work / "rounds"
    if not rounds.is_dir():
        return len(state.done)
    for child in sorted(rounds.iterdir()):
        if not child.name.isdigit() or int(child.name) in state.done or Trained.load(child) is None:
            continue
        try:
            summary = sdk.round(federation, int(child.name))
        except NotFound:
            continue
        if summary.state == RoundStatus.COMPLETE and client_id in summary.clients:
            _keep_variate(session.work, int(child.name))
            session.adopt_head(int(child.name))
            state.finish(int(child.name))
    return len(state.done)


def _keep_variate(work: Path, r: int) -> None:
    """SCAFFOLD: round ``r`` completed with this client's update, so its variate update is the client's own."""
    from .scaffold import keep_variate

    if keep_variate(work / "rounds" / f"{r:06d}" / CLIENT_VARIATE_FILE, work / CLIENT_VARIATE_FILE):
        log.info("round %d: keeping this client's updated SCAFFOLD variate", r)


def _prune(work: Path, *, keep: int) -> None:
    """Drop the trained adapters of rounds before ``keep`` (finished; nothing will re-upload them)."""
    rounds = work / "rounds"
    if not rounds.is_dir():
        return
    for child in rounds.iterdir():
        stem = child.name.removesuffix(".partial")
        if stem.isdigit() and int(stem) < keep:
            shutil.rmtree(child, ignore_errors=True)
