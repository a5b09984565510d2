"""What a client appends to its federation's inbox: a plain, signed record (data, never a task).

The record is one stream entry with a single field ``m``: the JSON of an :class:`IngestMessage`.
Workers parse it strictly, verify its HMAC with the client's registered secret, and only then
turn it into a task of their own. The object key is not part of the message: it is derived
from the authenticated client id and the sha256 (``layout.delta_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from .errors import InvalidAdapter, InvalidReport

VERSION = 2
#: the stream field that carries the message
RECORD_FIELD = "m"
SIGNED_FIELDS = (
    "v",
    "federation",
    "round",
    "client_id",
    "sha256",
    "size",
    "dataset_size",
    "dp",
    "upload_id",
    "ts",
    "nonce",
)
#: signed only when present, so records from clients that never send them keep their signatures
OPTIONAL_SIGNED_FIELDS = ("lr_sum", "label_counts", "global_eval", "base_version")
_TOKEN = r"^[A-Za-z0-9_-]{8,64}$"
#: a label histogram names at most this many labels, each at most this long; a count is at most this
MAX_HISTOGRAM_LABELS = 1024
MAX_LABEL_NAME = 256
MAX_COUNT = 10**12
_Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]


class ClientDP(BaseModel):
    """A client's own report of the differential privacy its local training spent (cumulative)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    accountant: str = Field(default="rdp", max_length=32)


class GlobalEval(BaseModel):
    """A client's evaluation of a round's global model on its own evaluation data (as it reports it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: the round whose global model was evaluated (before this upload's round)
    round: StrictInt = Field(ge=0)
    loss: float = Field(ge=0)
    #: seq-cls: label accuracy; causal-lm: next-token accuracy
    accuracy: float | None = Field(default=None, ge=0, le=1)
    examples: StrictInt = Field(gt=0, le=MAX_COUNT)


class IngestMessage(BaseModel):
    """Metadata for one uploaded delta; the object itself is in the store under the client's prefix."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    v: int = VERSION
    federation: str = Field(max_length=64)
    round: int | None = Field(default=None, ge=1)  # None: whatever round is open when the worker registers it
    client_id: str = Field(max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    dataset_size: float | None = Field(default=None, gt=0)
    dp: ClientDP | None = None
    #: SCAFFOLD federations: the learning rate summed over the client's local steps (K·η); ingest checks its range
    lr_sum: float | None = None
    #: the client's own label histogram of its training data (label name -> examples), as it declares it
    label_counts: dict[str, _Count] | None = Field(default=None, max_length=MAX_HISTOGRAM_LABELS)
    #: the client's evaluation of the global model it started this round from
    global_eval: GlobalEval | None = None
    #: buffered federations: the version (round) the delta was trained from; ingest refuses a stale one
    base_version: StrictInt | None = Field(default=None, ge=0)
    upload_id: str = Field(default_factory=lambda: secrets.token_hex(12), pattern=_TOKEN)
    ts: float = Field(default_factory=time.time)
    nonce: str = Field(default_factory=lambda: secrets.token_hex(16), pattern=_TOKEN)
    signature: str | None = Field(default=None, max_length=128)

    @field_validator("v")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != VERSION:
            raise ValueError(f"message version {v} is not supported (this worker speaks version {VERSION})")
        return v

    @field_validator("dataset_size")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("dataset_size must be finite")
        return value

    @field_validator("label_counts")
    @classmethod
    def _label_names(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for name in value or {}:
            if not name or len(name) > MAX_LABEL_NAME:
                raise ValueError(f"label names must have 1 to {MAX_LABEL_NAME} characters, got {name[:40]!r}")
        return value

    def check_report(self, labels: Sequence[str], round_: int | None, max_examples: float) -> None:
        """What the client reports beside its delta must fit its federation: label counts over the declared
        ``labels`` (when there are any) and no more examples than any client may claim, an evaluation of an
        earlier round than ``round_``. The parse bounded sizes and types; this needs the federation."""
        counts = self.label_counts or {}
        if labels:
            unknown = sorted(set(counts) - set(labels))
            if unknown:
                shown = ", ".join(repr(name[:40]) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
                raise InvalidReport(
                    f"label_counts names {len(unknown)} label(s) federation {self.federation!r} does not declare "
                    f"({shown}); its labels are {', '.join(labels)}"
                )
        limit = f"over the limit of {max_examples:g} (CHORUS_MAX_DATASET_SIZE)"
        if sum(counts.values()) > max_examples:
            raise InvalidReport(f"label_counts add up to {sum(counts.values())} examples, {limit}")
        report = self.global_eval
        if report is None:
            return
        if round_ is not None and report.round >= round_:
            raise InvalidReport(
                f"global_eval is of round {report.round}, but an upload to round {round_} can only report an "
                "earlier round's global model"
            )
        if report.examples > max_examples:
            raise InvalidReport(f"global_eval counts {report.examples} examples, {limit}")

    def canonical(self) -> bytes:
        body: dict[str, Any] = {}
        for name in SIGNED_FIELDS + OPTIONAL_SIGNED_FIELDS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_SIGNED_FIELDS:
                continue
            body[name] = value.model_dump() if isinstance(value, BaseModel) else value
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: str) -> IngestMessage:
        return self.model_copy(update={"signature": sign(secret, self.canonical())})

    def signature_valid(self, secret: str) -> bool:
        return self.signature is not None and hmac.compare_digest(self.signature, sign(secret, self.canonical()))

    def to_record(self) -> dict[str, str]:
        """The inbox stream entry's fields."""
        return {RECORD_FIELD: self.model_dump_json()}

    @classmethod
    def parse(cls, raw: Any) -> IngestMessage:
        """Validate a decoded message; ``InvalidAdapter`` names the first problem."""
        try:
            return cls.model_validate(raw if isinstance(raw, dict) else {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            raise InvalidAdapter(f"malformed ingest message: {where}: {first['msg']}") from None

    @classmethod
    def from_record(cls, fields: dict[str, str], max_bytes: int) -> IngestMessage:
        """Parse an inbox entry: one field ``m`` of at most ``max_bytes`` of JSON."""
        if set(fields) != {RECORD_FIELD}:
            raise InvalidAdapter(f"malformed inbox record: expected the single field {RECORD_FIELD!r}")
        raw = fields[RECORD_FIELD]
        if len(raw) > max_bytes:
            raise InvalidAdapter(f"inbox record is {len(raw)} bytes, over the {max_bytes}-byte limit")
        try:
            decoded = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidAdapter("malformed inbox record: not JSON") from None
        return cls.parse(decoded)


def sign(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
