"""A client's SDK: check its credentials, upload (plainly or in a secure round), wait for verdicts, pull rounds."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from ..errors import ChorusError, ConfigError, InvalidAdapter, InvalidReport, ObjectExists, Rejected, Timeout, TooLarge
from ..ids import check_name
from ..layout import delta_key
from ..manifest import Manifest
from ..messages import ClientDP, GlobalEval, IngestMessage
from ..names import EventType
from ..progress import byte_bar
from ..state import FederationConfig, FederationKeys
from ..state.inbox import Inbox
from .connection import redacted, service, url_client, url_password
from .reader import Reader
from .summaries import UploadResult

if TYPE_CHECKING:
    from ..secure_upload import SecureResult


class ParticipantSdk(Reader):
    """A registered client's credentials: upload deltas to its inbox and pull the rounds it trains from."""

    def check_identity(self, federation: str, client_id: str) -> None:
        """Fail fast, before any local work, where these credentials cannot be ``client_id``'s in ``federation``.

        A client URL from ``client add`` names its own user: it must be this client's, and its password
        must be the signing secret (records signed with another secret get no verdict at all). The
        federation's meta is then read with them, so a refused password fails here too.
        """
        check_name(client_id, "client id")
        owner = url_client(self.settings.redis_url)
        if owner is not None and owner != (federation, client_id):
            raise ConfigError(
                f"CHORUS_REDIS_URL holds the credentials of client {owner[1]!r} of federation {owner[0]!r}, "
                f"not of client {client_id!r} of federation {federation!r}: use the URL `client add` printed "
                "for this client"
            )
        password = url_password(self.settings.redis_url)
        if owner is not None and password is not None and self.secret != password:
            raise ConfigError(
                f"the signing secret (--secret / CHORUS_CLIENT_SECRET) is not the password of client "
                f"{client_id!r}'s Redis URL: both come from `chorus-mq client add`, and records signed with "
                "another secret get no verdict"
            )
        with service(self.settings):
            self.state.meta(federation)

    # -- upload --------------------------------------------------------------------------------

    def upload(
        self,
        federation: str,
        adapter: str | Path,
        client_id: str,
        *,
        dataset_size: float | None = None,
        round_: int | None = None,
        wait: bool = True,
        timeout: float = 300.0,
        lora_alpha: float | None = None,
        secret: str | None = None,
        dp: dict[str, Any] | None = None,
        label_counts: Mapping[str, int] | None = None,
        global_eval: GlobalEval | Mapping[str, Any] | None = None,
        progress: bool = False,
        lr_sum: float | None = None,
        base_version: int | None = None,
        secure_state_dir: str | Path | None = None,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> UploadResult:
        """Validate locally, store the delta under the client's prefix, append its signed record to the
        federation's inbox, and (by default) wait for the worker's verdict. ``lr_sum`` (SCAFFOLD
        federations): the learning rate summed over the local steps that trained the adapter.
        ``base_version`` (buffered federations, required there): the version the adapter was trained from;
        the delta goes into whatever buffer is open.

        ``label_counts`` (label -> examples of the training data) and ``global_eval`` (this client's evaluation
        of the global model it started from: round, loss, accuracy, examples) are optional reports that
        ``status`` and the round's manifest show; they are checked here as the workers will check them.

        On a ``--secure-aggregation`` federation the upload takes part in the round's secure aggregation
        (:meth:`secure_round`) and returns once the round published: status ``summed`` (this client's input is
        in the sum) or ``dropped``; ``secure_state_dir`` keeps its keys so a restarted upload resumes."""
        check_name(client_id, "client id")
        _check_amounts(dataset_size, lr_sum)
        with service(self.settings):
            cfg = FederationConfig.from_hash(self.state.meta(federation))
        cfg.check_upload(round_, base_version)
        if cfg.secure_aggregation:
            return self._upload_secure(
                federation,
                adapter,
                client_id,
                round_=round_,
                timeout=timeout,
                lora_alpha=lora_alpha,
                secret=secret,
                secure_state_dir=secure_state_dir,
                on_phase=on_phase,
            )
        report = _report(
            federation,
            client_id,
            label_counts,
            global_eval,
            labels=cfg.labels,
            round_=round_,
            max_examples=self.settings.max_dataset_size,
        )
        sha, size = self._store_delta(federation, adapter, client_id, lora_alpha=lora_alpha, progress=progress)
        msg = IngestMessage(
            federation=federation,
            round=round_,
            client_id=client_id,
            sha256=sha,
            size=size,
            dataset_size=dataset_size,
            dp=None if dp is None else ClientDP(**dp),
            lr_sum=lr_sum,
            label_counts=report.label_counts,
            global_eval=report.global_eval,
            base_version=base_version,
        )
        result = self.submit(msg, wait=wait, timeout=timeout, secret=secret)
        return dataclasses.replace(result, bytes=size)

    def _store_delta(
        self, federation: str, adapter: str | Path, client_id: str, *, lora_alpha: float | None, progress: bool
    ) -> tuple[str, int]:
        """Write the adapter as a delta under the client's prefix, named by its sha256; (sha256, size)."""
        from ..adapters import load_adapter, write_delta

        local = load_adapter(adapter, lora_alpha=lora_alpha)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "delta.safetensors"
            sha = write_delta(local, path)
            key = delta_key(federation, client_id, sha)
            size = path.stat().st_size
            try:
                self.store.put_file(key, path, write_once=True, progress=byte_bar(progress, size, "upload"))
            except ObjectExists:
                pass  # content-addressed: the same bytes are already there
        return sha, size

    def _upload_secure(
        self,
        federation: str,
        adapter: str | Path,
        client_id: str,
        *,
        round_: int | None,
        timeout: float,
        lora_alpha: float | None,
        secret: str | None,
        secure_state_dir: str | Path | None,
        on_phase: Callable[[int, str], None] | None,
    ) -> UploadResult:
        """A ``--secure-aggregation`` federation's upload: take part in the round's secure aggregation; status
        ``summed`` or ``dropped`` once the round published."""
        from ..adapters import load_adapter

        local = load_adapter(adapter, lora_alpha=lora_alpha)
        secure = self.secure_round(
            federation,
            client_id,
            local.tensors,
            round_=round_,
            timeout=timeout,
            secret=secret,
            state_dir=secure_state_dir,
            on_phase=on_phase,
        )
        return UploadResult(
            federation,
            client_id,
            "",
            "",
            secure.masked_key,
            secure.round,
            "summed" if client_id in secure.summed else "dropped",
            len(secure.summed),
        )

    def secure_round(
        self,
        federation: str,
        client_id: str,
        tensors: Mapping[str, Any],
        *,
        round_: int | None = None,
        timeout: float = 600.0,
        poll: float = 0.1,
        secret: str | None = None,
        state_dir: str | Path | None = None,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> SecureResult:
        """Take part in a secure round (a ``--secure-aggregation`` federation) with ``tensors`` (the round's trained
        factor of every module, and the task head if any): every phase, then wait until the round publishes.
        ``state_dir`` keeps this client's keys between phases, so a restarted client resumes its round."""
        from ..secure_upload import SecureUpload

        check_name(client_id, "client id")
        key = secret or self.secret
        if not key:
            raise ConfigError("secure aggregation needs a registered client's secret: its records are signed")
        r = round_ if round_ is not None else self.state.current_round(federation)
        session = SecureUpload(
            self,
            federation,
            client_id,
            r,
            secret=key,
            state_dir=None if state_dir is None else Path(state_dir),
            on_phase=on_phase,
        )
        return session.run(tensors, timeout=timeout, poll=poll)

    def submit(
        self, msg: IngestMessage, *, wait: bool = True, timeout: float = 300.0, secret: str | None = None
    ) -> UploadResult:
        """Append a record for an object already in the store, signed with the client's secret."""
        secret = secret or self.secret
        if secret:
            msg = msg.signed(secret)
        record = msg.model_dump_json()
        if len(record) > self.settings.max_inbox_record_bytes:
            counts = f" (its label_counts name {len(msg.label_counts)} labels)" if msg.label_counts else ""
            raise TooLarge(
                f"the upload record is {len(record)} bytes{counts}, over the {self.settings.max_inbox_record_bytes}"
                "-byte limit on inbox records (CHORUS_MAX_INBOX_RECORD_BYTES)"
            )
        log = self.state.events(msg.federation)
        with service(self.settings):
            after = log.last_id()
            # a registered (signing) client appends to its own inbox; unsigned development uploads to the shared one
            owner = msg.client_id if msg.signature else None
            Inbox(self.redis, msg.federation, owner).append(record)
        if self.settings.eager:
            self.drain_if_eager(msg.federation)
        result = UploadResult(
            msg.federation,
            msg.client_id,
            msg.upload_id,
            msg.sha256,
            delta_key(msg.federation, msg.client_id, msg.sha256),
            msg.round,
            "queued",
        )
        if not wait:
            return result
        started = checked = time.monotonic()
        for event in log.follow(after, deadline=started + timeout):
            if event is None or time.monotonic() - checked > 2:
                # a repeated rejection is counted in its round, not published: look there now and then
                checked = time.monotonic()
                repeated = self._repeated_rejection(msg)
                if repeated is not None:
                    raise Rejected(*repeated)
            if event is None:
                continue
            # the stream is the federation's: another client can reuse this upload_id on its own records
            if event.fields.get("upload_id") != msg.upload_id or event.fields.get("client") != msg.client_id:
                continue
            if event.type == EventType.DELTA_REJECTED:
                raise Rejected(str(event.fields.get("reason")), str(event.fields.get("code", "rejected")))
            if event.type == EventType.DELTA_ACCEPTED:
                status = "duplicate" if event.fields.get("duplicate") else "accepted"
                return dataclasses.replace(result, status=status, round=event.round, n=event.fields.get("n"))
        inbox = "its own inbox" if owner else "the federation's shared inbox"
        raise Timeout(
            f"no verdict yet for upload {msg.upload_id} after {time.monotonic() - started:.0f}s: its record is in "
            f"{inbox} of {msg.federation!r} (appended at {redacted(self.settings.redis_url)}) and no worker has "
            "judged it. The ingest workers may be down or behind (`chorus-mq worker --role ingest`); the record "
            "stays in the inbox and is judged when they are back, so waiting again for the same upload is safe. "
            "Records whose signature does not verify, and records over the client's rate budget "
            "(CHORUS_INBOX_RATE_PER_S), are dropped without an answer (`status` counts those)"
        )

    def _repeated_rejection(self, msg: IngestMessage) -> tuple[str, str] | None:
        """(reason, code) when the workers rejected this upload as a repeat (counted in its round, not published)."""
        keys = FederationKeys(msg.federation)
        try:
            rounds = [msg.round] if msg.round else [self.state.current_round(msg.federation)]
            for r in rounds:
                raw = self.redis.hget(keys.rejections(r), f"last:{msg.client_id}")
                if raw is None:
                    continue
                last = json.loads(raw)
                if isinstance(last, dict) and last.get("upload_id") == msg.upload_id:
                    return str(last.get("reason", "")), str(last.get("code", "rejected"))
        except (redis_lib.RedisError, ChorusError, ValueError):
            return None  # unreadable now: keep waiting for the event
        return None

    def pull(
        self,
        federation: str,
        output: str | Path,
        round_: int | None = None,
        *,
        since: int | None = None,
        exact_adapter: bool = False,
        residual_adapter: bool = False,
        fold: bool = False,
        progress: bool = False,
    ) -> Manifest:
        """Write round ``round_``'s global adapter (PEFT-loadable), its residual and the base correction into
        ``output``. A directory that holds an earlier round of this federation is brought up to date with the
        increments only (``since`` names that round explicitly); a new one starts from the latest snapshot.

        The correction is ``cumulative_residual.safetensors`` plus the files in ``increments/``
        (:func:`chorus_mq.pulled.iter_correction` sums them); ``fold=True`` folds it into the one file now.
        """
        from ..pulled import pull

        with service(self.settings):
            return pull(
                self.state,
                self.store,
                federation,
                Path(output),
                round_,
                since=since,
                exact_adapter=exact_adapter,
                residual_adapter=residual_adapter,
                fold=fold,
                progress=progress,
            )


def _report(
    federation: str,
    client_id: str,
    label_counts: Mapping[str, int] | None,
    global_eval: GlobalEval | Mapping[str, Any] | None,
    *,
    labels: tuple[str, ...],
    round_: int | None,
    max_examples: float,
) -> IngestMessage:
    """A client's optional reports, parsed and checked as the workers will (a clear error now, not a lost
    record); returned on a message that carries nothing else."""
    body: dict[str, Any] = {"federation": federation, "client_id": client_id, "sha256": "0" * 64, "size": 0}
    if label_counts is not None:
        body["label_counts"] = dict(label_counts)
    if global_eval is not None:
        body["global_eval"] = global_eval.model_dump() if isinstance(global_eval, GlobalEval) else dict(global_eval)
    try:
        msg = IngestMessage.parse(body)
    except InvalidAdapter as exc:
        raise InvalidReport(str(exc).replace("malformed ingest message", "upload report")) from None
    msg.check_report(labels, round_, max_examples)
    return msg


def _check_amounts(dataset_size: float | None, lr_sum: float | None) -> None:
    """Refuse a dataset size or an lr_sum that is given but not a finite number above 0."""
    if dataset_size is not None and not (math.isfinite(dataset_size) and dataset_size > 0):
        raise ConfigError(f"dataset size must be a finite number above 0, got {dataset_size!r}")
    if lr_sum is not None and not (math.isfinite(lr_sum) and lr_sum > 0):
        raise ConfigError(f"lr_sum must be a finite number above 0, got {lr_sum!r}")
