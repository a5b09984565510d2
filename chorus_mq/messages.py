"""The ingest message a client enqueues, and its HMAC signature (canonical, field-ordered JSON)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time

from pydantic import BaseModel, Field, ValidationError

from .errors import InvalidAdapter

VERSION = 1
SIGNED_FIELDS = ("v", "federation", "round", "client_id", "object_key", "sha256", "size",
                 "dataset_size", "upload_id", "ts", "nonce")


class IngestMessage(BaseModel):
    """Metadata for one uploaded delta; the object itself is in the store under ``object_key``."""

    v: int = VERSION
    federation: str
    round: int | None = None  # None: whatever round is open when the worker registers it
    client_id: str
    object_key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    dataset_size: float | None = Field(default=None, gt=0)
    upload_id: str = Field(default_factory=lambda: secrets.token_hex(12), pattern=r"^[A-Za-z0-9_-]{8,64}$")
    ts: float = Field(default_factory=time.time)
    nonce: str = Field(default_factory=lambda: secrets.token_hex(16), pattern=r"^[A-Za-z0-9_-]{8,64}$")
    signature: str | None = None

    def canonical(self) -> bytes:
        body = {name: getattr(self, name) for name in SIGNED_FIELDS}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: str) -> "IngestMessage":
        return self.model_copy(update={"signature": sign(secret, self.canonical())})

    def signature_valid(self, secret: str) -> bool:
        return self.signature is not None and hmac.compare_digest(self.signature, sign(secret, self.canonical()))

    @classmethod
    def parse(cls, raw: dict) -> "IngestMessage":
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidAdapter(f"malformed ingest message: {where}: {first['msg']}") from None


def sign(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
