"""A client's pulled directory: the round's adapter, its increment, and the folded base correction.

Clients move increments, not history: a directory that holds round r' of a federation is brought
to round r by downloading the residuals of rounds r'+1..r only and folding them into its fp32
correction; a new directory starts from the latest compacted snapshot <= r plus the increments
after it. Every object is checked against the hashes the round's manifest lists (the manifest
itself against the hash Redis recorded at commit). Files are streamed module by module and each
is written once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, NotFound
from .manifest import Manifest
from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CUMULATIVE_FILE,
    EXACT_ADAPTER_DIR,
    LOCAL_FORMAT,
    LOCAL_STATE_FILE,
    MANIFEST_FILE,
    RESIDUAL_ADAPTER_DIR,
    RESIDUAL_FILE,
    RESIDUAL_FORMAT,
    RoundStatus,
)
from .results import fetch_manifest, fold_residuals, merge_objects, write_empty_residual

if TYPE_CHECKING:
    from .client import ChorusClient


@dataclass(frozen=True)
class LocalState:
    """``state.json``: which federation and round a pulled directory holds."""

    federation: str
    round: int
    manifest_sha256: str

    @classmethod
    def load(cls, out: Path) -> LocalState | None:
        path = out / LOCAL_STATE_FILE
        if not path.is_file() or not (out / CUMULATIVE_FILE).is_file():
            return None
        try:
            d = json.loads(path.read_text())
            if d.get("format") != LOCAL_FORMAT:
                return None
            return cls(federation=str(d["federation"]), round=int(d["round"]),
                       manifest_sha256=str(d["manifest_sha256"]))
        except (ValueError, KeyError, TypeError):
            return None

    def save(self, out: Path) -> None:
        body = {"format": LOCAL_FORMAT, "federation": self.federation, "round": self.round,
                "manifest_sha256": self.manifest_sha256}
        _atomic_write(out / LOCAL_STATE_FILE, json.dumps(body, indent=2, sort_keys=True).encode())


def pull(sdk: ChorusClient, federation: str, out: Path, round_: int | None, *, since: int | None = None,
         exact_adapter: bool = False, residual_adapter: bool = False, progress: bool = False) -> Manifest:
    """See :meth:`chorus_mq.client.ChorusClient.pull`."""
    state = sdk.state
    target = round_ if round_ is not None else state.latest_complete(federation)
    if target is None:
        raise NotFound(f"federation {federation!r} has no complete round yet")
    manifest, manifest_sha = fetch_manifest(sdk.state, sdk.store, federation, target)
    out.mkdir(parents=True, exist_ok=True)
    held = LocalState.load(out)
    if since is not None:
        if held is None or held.federation != federation or held.round != since:
            have = "nothing" if held is None else f"round {held.round} of {held.federation!r}"
            raise ConfigError(f"--since {since}: {out} holds {have}; pull without --since to start over")
        if since > target:
            raise ConfigError(f"--since {since} is after the round asked for ({target})")
    if held is not None and held.federation == federation and held.round <= target:
        base: Path | None = out / CUMULATIVE_FILE
        start = held.round
    else:
        base, start = None, None
    with tempfile.TemporaryDirectory(dir=out, prefix=".pull-") as tmp:
        spool = Path(tmp)
        if start is None:
            snapshot = _latest_snapshot(sdk, federation, target)
            if snapshot is not None:
                base = spool / "snapshot.safetensors"
                sdk.store.download(snapshot.key, base, expected_sha256=snapshot.sha256)
                start = snapshot.round
            else:
                start = 0
        this_round = spool / f"residual-{target}.safetensors"
        has_residual = merge_objects(sdk.store, [s.residual for s in manifest.shards if s.residual is not None],
                                     this_round, {"format": RESIDUAL_FORMAT})
        increments: list[Path] = []
        for r in _complete_rounds(sdk, federation, start, target):
            if r == target:
                if has_residual:
                    increments.append(this_round)
                continue
            m = fetch_manifest(sdk.state, sdk.store, federation, r)[0]
            path = spool / f"residual-{r}.safetensors"
            if merge_objects(sdk.store, [s.residual for s in m.shards if s.residual is not None], path,
                             {"format": RESIDUAL_FORMAT}):
                increments.append(path)
        if not has_residual:
            write_empty_residual(this_round)
        # the round's adapter, written once (into the spool, then moved into place)
        merge_objects(sdk.store, [s.adapter for s in manifest.shards], spool / ADAPTER_WEIGHTS, {"format": "pt"})
        cumulative = spool / CUMULATIVE_FILE
        fold_residuals(([base] if base is not None and base.exists() else []) + increments, cumulative)
        os.replace(spool / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
        os.replace(this_round, out / RESIDUAL_FILE)
        os.replace(cumulative, out / CUMULATIVE_FILE)
    _atomic_write(out / ADAPTER_CONFIG, (json.dumps(manifest.adapter_config, indent=2, sort_keys=True) + "\n").encode())
    _atomic_write(out / MANIFEST_FILE, manifest.to_json())
    LocalState(federation, target, manifest_sha).save(out)
    if exact_adapter or residual_adapter:
        _extra_adapters(out, exact_adapter=exact_adapter, residual_adapter=residual_adapter)
    return manifest


@dataclass(frozen=True)
class _Snapshot:
    round: int
    key: str
    sha256: str


def _latest_snapshot(sdk: ChorusClient, federation: str, target: int) -> _Snapshot | None:
    best = None
    for r, rec in sdk.state.snapshots(federation).items():
        if r <= target and (best is None or r > best.round):
            best = _Snapshot(r, rec.key, rec.sha256)
    return best


def _complete_rounds(sdk: ChorusClient, federation: str, after: int, upto: int) -> list[int]:
    return [info.round for info in sdk.state.rounds(federation)
            if after < info.round <= upto and info.state == RoundStatus.COMPLETE]


def _extra_adapters(out: Path, *, exact_adapter: bool, residual_adapter: bool) -> None:
    """Outputs that factorise dense residuals (expensive): built only on request."""
    from .adapters import LoraSpec, read_residual, write_exact_adapter, write_residual_adapter

    cumulative = read_residual(out / CUMULATIVE_FILE)
    if residual_adapter:
        shutil.rmtree(out / RESIDUAL_ADAPTER_DIR, ignore_errors=True)
        if cumulative:
            spec = LoraSpec.from_peft_config(json.loads((out / ADAPTER_CONFIG).read_text()))
            write_residual_adapter(out / RESIDUAL_ADAPTER_DIR, cumulative, spec)
    if exact_adapter:
        shutil.rmtree(out / EXACT_ADAPTER_DIR, ignore_errors=True)
        write_exact_adapter(out / EXACT_ADAPTER_DIR, out, cumulative)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
