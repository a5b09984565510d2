"""The Python SDK. The CLI is a thin layer over it; ``simulate`` drives it in-process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis as redis_lib

from .adapters import LoraSpec, load_adapter, read_residual, write_delta, write_exact_adapter, write_residual_adapter
from .errors import ChorusError, NotFound, ObjectExists, Rejected, Timeout
from .ids import check_name
from .layout import delta_key
from .messages import IngestMessage
from .settings import Settings, get_settings
from .state import EventLog, FederationConfig, RoundState
from .state.clients import ClientRegistry
from .state.events import TERMINAL
from .store import Store, open_store

PULLED_FILES = ("adapter_config.json", "adapter_model.safetensors", "residual.safetensors",
                "cumulative_residual.safetensors")


@dataclass(frozen=True)
class UploadResult:
    federation: str
    client_id: str
    upload_id: str
    sha256: str
    object_key: str
    round: int | None
    status: str  # queued (no wait) | accepted | duplicate | fired
    n: int | None = None


class ChorusClient:
    """Talk to a chorus-mq deployment: Redis for state and the queue, object storage for tensors."""

    def __init__(self, settings: Settings | None = None, *, redis: redis_lib.Redis | None = None,
                 store: Store | None = None, secret: str | None = None):
        self.settings = settings or get_settings()
        self.redis = redis or redis_lib.Redis.from_url(self.settings.redis_url, decode_responses=True)
        self.store = store or open_store(self.settings.store, self.settings)
        self.state = RoundState(self.redis, maxlen=self.settings.events_maxlen,
                                lease_s=self.settings.aggregation_lease)
        self.secret = secret

    # -- federations and rounds ------------------------------------------------------

    def create_federation(self, name: str, *, base_model: str, quorum: int, **options: Any) -> FederationConfig:
        cfg = FederationConfig(name=name, base_model=base_model, quorum=quorum, **options)
        self.state.create_federation(cfg)
        return cfg

    def status(self, federation: str) -> dict[str, Any]:
        meta = self.state.meta(federation)
        cfg = FederationConfig.from_hash(meta)
        current = int(meta["current_round"])
        rnd = self.state.round(federation, current)
        return {
            "federation": federation,
            "base_model": cfg.base_model,
            "strategy": cfg.strategy,
            "quorum": cfg.quorum,
            "min_quorum": cfg.effective_min_quorum,
            "round_timeout": cfg.round_timeout,
            "current_round": current,
            "state": rnd["state"],
            "deltas": rnd["n"],
            "deadline": rnd.get("deadline") or None,
            "latest_complete": int(meta.get("latest_complete", 0)) or None,
            **({"privacy": self.privacy(federation)} if cfg.dp_noise_multiplier else {}),
        }

    def privacy(self, federation: str) -> dict[str, dict]:
        """Privacy spent by each authenticated client: every complete round it took part in is one
        Gaussian release at the federation's noise multiplier, composed by the accountant."""
        from .aggregation.dp import PrivacyAccountant
        cfg = self.state.config(federation)
        rounds: dict[str, int] = {}
        for info in self.state.rounds(federation):
            if info["state"] == "complete":
                for client in self.state.deltas(federation, info["round"]):
                    rounds[client] = rounds.get(client, 0) + 1
        out = {}
        for client, k in rounds.items():
            acc = PrivacyAccountant()
            acc.spend(cfg.dp_noise_multiplier, rounds=k)
            out[client] = {"epsilon": acc.epsilon(cfg.dp_delta), "delta": cfg.dp_delta, "rounds": k}
        return out

    def rounds(self, federation: str) -> list[dict[str, Any]]:
        out = []
        for info in self.state.rounds(federation):
            info["clients"] = sorted(self.state.deltas(federation, info["round"]))
            out.append(info)
        return out

    def close_round(self, federation: str, round_: int | None = None):
        """Close a round by hand: aggregate what it has (at least min-quorum deltas)."""
        r = round_ or self.state.current_round(federation)
        t = self.state.close(federation, r, "manual")
        if t.status == "too_few":
            raise ChorusError(f"round {r} has {t.n} deltas; at least {t.detail} are needed to close it")
        if t.status == "noop":
            raise ChorusError(f"round {r} is not open (state {t.detail})")
        if t.status == "fired":
            self._dispatch_aggregate(federation, r, t.epoch)
        return t

    # -- clients ---------------------------------------------------------------------

    def clients(self, federation: str) -> ClientRegistry:
        self.state.meta(federation)
        return ClientRegistry(self.redis, federation)

    # -- upload ----------------------------------------------------------------------

    def upload(self, federation: str, adapter: str | Path, client_id: str, *, dataset_size: float | None = None,
               round_: int | None = None, wait: bool = True, timeout: float = 300.0,
               lora_alpha: float | None = None, secret: str | None = None) -> UploadResult:
        """Validate locally, store the delta, enqueue its message, and (by default) wait for the verdict."""
        check_name(client_id, "client id")
        self.state.meta(federation)
        local = load_adapter(adapter, lora_alpha=lora_alpha)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "delta.safetensors"
            sha = write_delta(local, path)
            key = delta_key(federation, client_id, sha)
            try:
                self.store.put_file(key, path, write_once=True)
            except ObjectExists:
                pass  # content-addressed: the same bytes are already there
            size = path.stat().st_size
        msg = IngestMessage(federation=federation, round=round_, client_id=client_id, object_key=key,
                            sha256=sha, size=size, dataset_size=dataset_size)
        return self.submit(msg, wait=wait, timeout=timeout, secret=secret)

    def submit(self, msg: IngestMessage, *, wait: bool = True, timeout: float = 300.0,
               secret: str | None = None) -> UploadResult:
        """Enqueue an ingest message for an object already in the store, signed with the client's secret."""
        secret = secret or self.secret
        if secret:
            msg = msg.signed(secret)
        log = EventLog(self.redis, msg.federation, self.settings.events_maxlen, self.state.scripts)
        after = log.last_id()
        self._dispatch_ingest(msg.model_dump())
        result = UploadResult(msg.federation, msg.client_id, msg.upload_id, msg.sha256, msg.object_key,
                              msg.round, "queued")
        if not wait:
            return result
        for _id, event in log.follow(after, deadline=time.monotonic() + timeout):
            if event.get("upload_id") != msg.upload_id:
                continue
            if event["type"] == "delta_rejected":
                raise Rejected(event["reason"], event.get("code", "rejected"))
            if event["type"] == "delta_accepted":
                status = "duplicate" if event.get("duplicate") else "accepted"
                return dataclasses.replace(result, status=status, round=event["round"], n=event.get("n"))
        raise Timeout(f"no verdict for upload {msg.upload_id} within {timeout:.0f}s: is a worker running "
                      f"(`chorus-mq worker`) against {self.settings.redis_url}?")

    # -- events ----------------------------------------------------------------------

    def watch(self, federation: str, *, from_start: bool = False, after: str | None = None,
              until_round: int | None = None, timeout: float | None = None) -> Iterator[dict]:
        """Yield events (each with its stream ``id``) as they happen, from now, from the start, or
        ``after`` a stream id seen before; with ``until_round`` stop after that round ends."""
        self.state.meta(federation)
        log = EventLog(self.redis, federation, self.settings.events_maxlen, self.state.scripts)
        if after is None:
            replay = from_start or (until_round and self._ended(federation, until_round))
            after = "0-0" if replay else log.last_id()
        deadline = None if timeout is None else time.monotonic() + timeout
        for entry_id, event in log.follow(after, deadline=deadline):
            if not event:
                continue
            yield {"id": entry_id, **event}
            if until_round and event.get("round") == until_round and event["type"] in TERMINAL:
                return
        if until_round:
            raise Timeout(f"round {until_round} did not finish within {timeout:.0f}s")

    def _ended(self, federation: str, r: int) -> bool:
        try:
            return self.state.round(federation, r)["state"] in ("complete", "failed")
        except NotFound:
            return False

    # -- pull ------------------------------------------------------------------------

    def pull(self, federation: str, output: str | Path, round_: int | None = None) -> dict:
        """Write the round's PEFT adapter, residuals, residual adapter and manifest into ``output``."""
        meta = self.state.meta(federation)
        r = round_ or int(meta.get("latest_complete", 0))
        if not r:
            raise NotFound(f"federation {federation!r} has no complete round yet")
        info = self.state.round(federation, r)
        if info["state"] != "complete":
            raise NotFound(f"round {r} of {federation!r} is {info['state']}, not complete")
        manifest_bytes = self.store.get_bytes(info["manifest"])
        expected = info.get("manifest_sha256")
        if expected and hashlib.sha256(manifest_bytes).hexdigest() != expected:
            raise ChorusError(f"manifest of round {r} does not match the hash recorded at commit")
        manifest = json.loads(manifest_bytes)
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        for name in PULLED_FILES:
            obj = manifest["objects"][name]
            self.store.download(obj["key"], out / name, expected_sha256=obj["sha256"])
        (out / "manifest.json").write_bytes(manifest_bytes)
        spec = LoraSpec.from_peft_config(json.loads((out / "adapter_config.json").read_text()))
        cumulative = read_residual(out / "cumulative_residual.safetensors")
        if cumulative:
            write_residual_adapter(out / "residual_adapter", cumulative, spec)
        write_exact_adapter(out / "exact_adapter", out, cumulative)
        return manifest

    # -- dispatch --------------------------------------------------------------------

    def _dispatch_ingest(self, message: dict) -> None:
        from .workers import dispatch
        dispatch.ingest(self.settings, message)

    def _dispatch_aggregate(self, federation: str, r: int, epoch: int) -> None:
        from .workers import dispatch
        dispatch.aggregate(self.settings, federation, r, epoch)
