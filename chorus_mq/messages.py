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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidAdapter

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
OPTIONAL_SIGNED_FIELDS = ("lr_sum",)
_TOKEN = r"^[A-Za-z0-9_-]{8,64}$"


class ClientDP(BaseModel):
    """A client's own report of the differential privacy its local training spent (cumulative)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    accountant: str = Field(default="rdp", max_length=32)


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

    def canonical(self) -> bytes:
        body: dict[str, Any] = {}
        for name in SIGNED_FIELDS:
            value = getattr(self, name)
            body[name] = value.model_dump() if isinstance(value, BaseModel) else value
        for name in OPTIONAL_SIGNED_FIELDS:
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
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
