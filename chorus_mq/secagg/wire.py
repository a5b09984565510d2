"""Phase messages as signed inbox records: compact JSON, bytes as base64, parsed strictly.

A record is one JSON object: ``v``, ``kind`` (always ``"secagg"``), ``federation``, ``round``,
``client_id``, ``phase``, ``payload`` (the phase's message, below), ``ts``, ``nonce`` and
``signature`` (HMAC-SHA256 with the client's registered secret over the other fields, sorted,
compact JSON; the same signing as delta records). Payloads:

- advertise:    ``{"cipher_public": b64, "mask_public": b64}``
- share:        ``{"sealed": {recipient: b64}, "seed_commitment": b64}``
- masked_input: ``{"key": object key, "sha256": hex, "masked_with": [ids], "refused": {id: reason}}``
  (the masked vector itself, 8 bytes an element, travels through the store as a uint64 safetensors)
- unmask:       ``{"shares": {peer: [kind, b64]}}``

Everything a client sends is hostile until parsed here: wrong types, sizes or base64 are
:class:`PeerMisbehaved` naming the client.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PeerMisbehaved
from ..ids import check_name
from ..messages import sign
from ..names import SecAggPhase, ShareKind
from .keys import KEY_BYTES
from .masking import COMMITMENT_BYTES, SEALED_BYTES, SHARE_BYTES
from .messages import Advertise, ShareKeys, UnmaskResponse

VERSION = 1
KIND = "secagg"
_SIGNED = ("v", "kind", "federation", "round", "client_id", "phase", "payload", "ts", "nonce")
#: the longest reason a client may give for refusing a neighbour's share
MAX_REASON = 300
_CLIENT_PHASES = (SecAggPhase.ADVERTISE, SecAggPhase.SHARE, SecAggPhase.MASKED_INPUT, SecAggPhase.UNMASK)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(client: str, value: Any, size: int, what: str) -> bytes:
    """Strict base64 of exactly ``size`` bytes, or :class:`PeerMisbehaved`."""
    if not isinstance(value, str) or len(value) > 4 * size:
        raise PeerMisbehaved(client, f"{what} must be base64 of {size} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PeerMisbehaved(client, f"{what} is not valid base64") from None
    if len(raw) != size:
        raise PeerMisbehaved(client, f"{what} is {len(raw)} bytes, not {size}")
    return raw


def _ids(client: str, value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, dict)):
        raise PeerMisbehaved(client, f"{what} must be a list or object of client ids")
    out = []
    for c in value:
        try:
            out.append(check_name(c, "client id"))
        except Exception:
            raise PeerMisbehaved(client, f"{what} holds {str(c)[:40]!r}, not a client id") from None
    return out


def _obj(client: str, value: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise PeerMisbehaved(client, f"the {what} payload must have exactly the fields {sorted(keys)}")
    return value


@dataclass(frozen=True)
class PhaseRecord:
    """One client's signed message for one phase of a secure round."""

    federation: str
    round: int
    client_id: str
    phase: SecAggPhase
    payload: Mapping[str, Any]
    ts: float = 0.0
    nonce: str = ""
    signature: str = ""

    def _body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": KIND,
            "federation": self.federation,
            "round": self.round,
            "client_id": self.client_id,
            "phase": self.phase.value,
            "payload": dict(self.payload),
            "ts": self.ts,
            "nonce": self.nonce,
        }

    def canonical(self) -> bytes:
        body = self._body()
        return json.dumps({k: body[k] for k in _SIGNED}, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: str) -> PhaseRecord:
        fresh = PhaseRecord(
            self.federation, self.round, self.client_id, self.phase, self.payload, time.time(), secrets.token_hex(16)
        )
        return PhaseRecord(**{**fresh.__dict__, "signature": sign(secret, fresh.canonical())})

    def signature_valid(self, secret: str) -> bool:
        return bool(self.signature) and hmac.compare_digest(self.signature, sign(secret, self.canonical()))

    def to_json(self) -> str:
        return json.dumps({**self._body(), "signature": self.signature}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: str, max_bytes: int = 64 * 1024) -> PhaseRecord:
        """A record from an inbox entry; malformed is :class:`PeerMisbehaved` (client ``?`` when unnamed)."""
        if len(raw) > max_bytes:
            raise PeerMisbehaved("?", f"secure-aggregation record of {len(raw)} bytes, over {max_bytes}")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise PeerMisbehaved("?", "secure-aggregation record is not JSON") from None
        client = str(body.get("client_id", "?"))[:64] if isinstance(body, dict) else "?"
        want = {*_SIGNED, "signature"}
        if not isinstance(body, dict) or set(body) != want:
            raise PeerMisbehaved(client, f"a secure-aggregation record has exactly the fields {sorted(want)}")
        try:
            phase = SecAggPhase(body["phase"])
            check_name(body["client_id"], "client id")
            check_name(body["federation"], "federation")
        except (ValueError, TypeError, Exception) as exc:
            raise PeerMisbehaved(client, f"malformed record: {exc}") from None
        if phase not in _CLIENT_PHASES:
            raise PeerMisbehaved(client, f"clients do not send {phase} records")
        if body["v"] != VERSION or body["kind"] != KIND:
            raise PeerMisbehaved(client, f"record version/kind must be {VERSION}/{KIND}")
        if not isinstance(body["round"], int) or isinstance(body["round"], bool) or body["round"] < 0:
            raise PeerMisbehaved(client, "round must be an integer >= 0")
        if not isinstance(body["payload"], dict):
            raise PeerMisbehaved(client, "payload must be a JSON object")
        if not isinstance(body["ts"], (int, float)) or not isinstance(body["nonce"], str):
            raise PeerMisbehaved(client, "ts must be a number and nonce a string")
        if not isinstance(body["signature"], str):
            raise PeerMisbehaved(client, "signature must be a string")
        return cls(
            body["federation"],
            body["round"],
            body["client_id"],
            phase,
            body["payload"],
            float(body["ts"]),
            body["nonce"],
            body["signature"],
        )


# -- payloads ---------------------------------------------------------------------------------


def advertise_payload(msg: Advertise) -> dict[str, Any]:
    return {"cipher_public": b64(msg.cipher_public), "mask_public": b64(msg.mask_public)}


def parse_advertise(client: str, payload: Any) -> Advertise:
    p = _obj(client, payload, {"cipher_public", "mask_public"}, "advertise")
    return Advertise(
        client,
        unb64(client, p["cipher_public"], KEY_BYTES, "cipher_public"),
        unb64(client, p["mask_public"], KEY_BYTES, "mask_public"),
    )


def share_payload(msg: ShareKeys) -> dict[str, Any]:
    return {"sealed": {k: b64(v) for k, v in sorted(msg.sealed.items())}, "seed_commitment": b64(msg.seed_commitment)}


def parse_share(client: str, payload: Any, max_recipients: int) -> ShareKeys:
    p = _obj(client, payload, {"sealed", "seed_commitment"}, "share")
    if not isinstance(p["sealed"], dict) or len(p["sealed"]) > max_recipients:
        raise PeerMisbehaved(client, f"sealed must map at most {max_recipients} recipients to shares")
    recipients = _ids(client, p["sealed"], "sealed")
    sealed = {to: unb64(client, p["sealed"][to], SEALED_BYTES, f"the sealed share for {to!r}") for to in recipients}
    return ShareKeys(client, sealed, unb64(client, p["seed_commitment"], COMMITMENT_BYTES, "seed_commitment"))


def unmask_payload(msg: UnmaskResponse) -> dict[str, Any]:
    return {"shares": {peer: [kind.value, b64(raw)] for peer, (kind, raw) in sorted(msg.shares.items())}}


def parse_unmask(client: str, payload: Any, max_peers: int) -> UnmaskResponse:
    p = _obj(client, payload, {"shares"}, "unmask")
    if not isinstance(p["shares"], dict) or len(p["shares"]) > max_peers:
        raise PeerMisbehaved(client, f"shares must map at most {max_peers} peers to one share each")
    out: dict[str, tuple[ShareKind, bytes]] = {}
    for peer in _ids(client, p["shares"], "shares"):
        item = p["shares"][peer]
        if not (isinstance(item, list) and len(item) == 2 and item[0] in ShareKind.values()):
            raise PeerMisbehaved(client, f"the share of {peer!r} must be [kind, base64]")
        out[peer] = (ShareKind(item[0]), unb64(client, item[1], SHARE_BYTES, f"the share of {peer!r}"))
    return UnmaskResponse(client, out)


def masked_payload(key: str, sha256: str, masked_with: frozenset[str], refused: Mapping[str, str]) -> dict[str, Any]:
    return {
        "key": key,
        "sha256": sha256,
        "masked_with": sorted(masked_with),
        "refused": {k: v[:MAX_REASON] for k, v in sorted(refused.items())},
    }


@dataclass(frozen=True)
class MaskedRef:
    """Where a client's masked input lies in the store, and what it says it paired with."""

    client: str
    key: str
    sha256: str
    masked_with: frozenset[str]
    refused: Mapping[str, str]


def parse_masked(client: str, payload: Any, max_peers: int) -> MaskedRef:
    p = _obj(client, payload, {"key", "sha256", "masked_with", "refused"}, "masked_input")
    sha = p["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise PeerMisbehaved(client, "sha256 must be 64 lowercase hex digits")
    if not isinstance(p["key"], str) or not 0 < len(p["key"]) <= 512:
        raise PeerMisbehaved(client, "key must be an object key")
    if not isinstance(p["masked_with"], list) or len(p["masked_with"]) > max_peers:
        raise PeerMisbehaved(client, f"masked_with must list at most {max_peers} peers")
    if not isinstance(p["refused"], dict) or len(p["refused"]) > max_peers:
        raise PeerMisbehaved(client, f"refused must map at most {max_peers} peers to a reason")
    refused = {c: str(p["refused"][c])[:MAX_REASON] for c in _ids(client, p["refused"], "refused")}
    return MaskedRef(client, p["key"], sha, frozenset(_ids(client, p["masked_with"], "masked_with")), refused)
