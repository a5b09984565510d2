"""Aggregate one round: deterministic, module by module, write-once results, manifest last, fenced finalize."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

from ..adapters import DeltaFile, LoraSpec, read_residual, write_peft_adapter, write_residual
from ..adapters.spec import default_targets
from ..aggregation import Residual, aggregate_module, chain_residuals, map_ordered, weighted_mean
from ..errors import AggregationError, InvalidAdapter, ObjectExists, ObjectMissing
from ..layout import artifact_key, manifest_key
from ..memory import retain_freed_memory
from ..state.rounds import FederationConfig
from .runtime import Runtime
from .screening import client_update, dp_release, noise_generator, screen_round

log = logging.getLogger(__name__)

FORMAT = "chorus-round/1"
RESULT_FILES = ("adapter_config.json", "adapter_model.safetensors", "residual.safetensors",
                "cumulative_residual.safetensors")


def aggregate_round(rt: Runtime, federation: str, r: int, epoch: int) -> str:
    """Aggregate round ``r`` under ``epoch``; returns the finalize status. Idempotent."""
    info = rt.state.round(federation, r)
    if info["state"] != "aggregating" or int(info["epoch"]) != epoch:
        log.info("skip %s round %s epoch %s: state %s epoch %s", federation, r, epoch, info["state"], info["epoch"])
        return "stale"
    retain_freed_memory()
    key = manifest_key(federation, r)
    try:
        manifest_bytes = rt.store.get_bytes(key)  # an earlier run already committed the result
    except ObjectMissing:
        manifest_bytes = None
    if manifest_bytes is None:
        try:
            manifest_bytes = _compute_and_write(rt, federation, r)
        except (AggregationError, InvalidAdapter, ObjectMissing) as exc:
            outcome = rt.state.fail(federation, r, epoch, f"{type(exc).__name__}: {exc}")
            log.error("round %s/%s failed: %s (%s)", federation, r, exc, outcome.status)
            return f"failed:{outcome.status}"
        try:
            rt.store.put_bytes(key, manifest_bytes, write_once=True)
        except ObjectExists:
            manifest_bytes = rt.store.get_bytes(key)  # a concurrent run committed first; adopt its result
    manifest = json.loads(manifest_bytes)
    summary = {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
               "clients": [c["client_id"] for c in manifest["clients"]],
               "excluded": manifest.get("excluded") or {},
               "strategy": manifest["strategy"]}
    outcome = rt.state.finalize(federation, r, epoch, key, summary)
    log.info("round %s/%s epoch %s finalize: %s", federation, r, epoch, outcome.status)
    return outcome.status


def _compute_and_write(rt: Runtime, federation: str, r: int) -> bytes:
    config = rt.state.config(federation)
    records = rt.state.deltas(federation, r)  # sorted by client id: a fixed order, deterministic sums
    if not records:
        raise AggregationError(f"round {r} has no deltas")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=rt.spool) as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        deltas = {}
        for client, rec in records.items():
            path = tmpdir / f"in-{client}.safetensors"
            rt.store.download(rec["object_key"], path, expected_sha256=rec["sha256"],
                              max_bytes=rt.settings.max_delta_bytes)
            deltas[client] = stack.enter_context(DeltaFile.open(path, max_header_bytes=rt.settings.max_header_bytes))
        weights = _weights(records)
        modules, residuals, extras, screening = _aggregate_modules(rt, federation, r, deltas, weights, config)
        prev_round = _previous_complete(rt, federation, r)
        previous = _previous_cumulative(rt, federation, prev_round, tmpdir)
        names = sorted(set(previous) | set(residuals))
        # popped: each previous residual is released once chained, so memory never holds two
        # whole cumulative residuals
        chained = map_ordered(lambda name: chain_residuals(previous.pop(name, None), residuals.get(name)), names,
                              workers=rt.settings.aggregation_workers)
        cumulative = {name: res for name, res in zip(names, chained) if res is not None}
        spec = _output_spec(next(iter(deltas.values())).spec, modules, config.base_model)
        out = tmpdir / "out"
        # the writers hash what they write, so the outputs are not read back to hash them
        digests = {"adapter_model.safetensors": write_peft_adapter(out, modules, spec, extras),
                   "residual.safetensors": write_residual(out / "residual.safetensors", residuals),
                   "cumulative_residual.safetensors": write_residual(out / "cumulative_residual.safetensors",
                                                                     cumulative)}
        objects = {name: _put_artifact(rt, federation, r, out / name, digests.get(name)) for name in RESULT_FILES}
    manifest = {
        "format": FORMAT,
        "federation": federation,
        "round": r,
        "strategy": config.strategy,
        "base_model": config.base_model,
        "previous_round": prev_round,
        "clients": [
            {"client_id": c, "sha256": rec["sha256"], "object_key": rec["object_key"],
             "dataset_size": rec.get("dataset_size"), "weight": screening.weights.get(c, 0.0)}
            for c, rec in records.items()
        ],
        "excluded": screening.excluded,
        "clipped": {f"{c}:{m}": f for (c, m), f in sorted(screening.clip.items())},
        "dp": ({"noise_multiplier": config.dp_noise_multiplier, "clip_norm": config.clip_norm,
                "delta": config.dp_delta, "quorum": config.quorum} if config.dp_noise_multiplier else None),
        "modules": len(modules),
        "residual_bytes": sum(v.nbytes for v in residuals.values()),
        "cumulative_residual_bytes": sum(v.nbytes for v in cumulative.values()),
        "objects": objects,
        "aggregation_seconds": round(time.perf_counter() - started, 4),
    }
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def _weights(records: dict[str, dict]) -> dict[str, float]:
    """Dataset-size weights when every client gave one, equal weights otherwise."""
    sizes = [rec.get("dataset_size") for rec in records.values()]
    if all(s for s in sizes):
        total = float(sum(sizes))
        return {c: float(rec["dataset_size"]) / total for c, rec in records.items()}
    return {c: 1.0 / len(records) for c in records}


def _aggregate_modules(rt: Runtime, federation: str, r: int, deltas: dict[str, DeltaFile],
                       weights: dict[str, float], config: FederationConfig):
    """Module by module across clients, a few modules in flight (CHORUS_AGGREGATION_WORKERS), so
    memory holds those modules x N clients plus the outputs.

    A module absent from some clients is aggregated over the clients that carry it, with
    their weights renormalised (a client that did not train a module says nothing about it).
    Screening, when the federation asks for it, has already decided weights and clip factors.
    """
    screening = screen_round(deltas, weights, config)
    kept = {c: d for c, d in deltas.items() if c in screening.weights}
    if not kept:
        raise AggregationError(f"screening excluded every client: {screening.excluded}")
    noise_key = rt.state.noise_key(federation) if config.dp_noise_multiplier else ""
    out_rank = config.out_rank or None

    def load(name: str) -> list:  # in this thread: reads from the spooled files stay sequential
        return [screening.apply(c, name, client_update(d, name, screening.weights[c]))
                for c, d in kept.items() if name in d.modules]

    def run(job: tuple[str, list]):
        name, updates = job
        if config.dp_noise_multiplier:
            return dp_release(updates, quorum=config.quorum, clip_norm=config.clip_norm,
                              noise_multiplier=config.dp_noise_multiplier,
                              generator=noise_generator(noise_key, federation, r, name), out_rank=out_rank)
        # the output rank is a choice only for svd; the others keep the clients' largest rank
        return aggregate_module(updates, config.strategy, out_rank=out_rank if config.strategy == "svd" else None)

    names = sorted({m for d in kept.values() for m in d.modules})
    results = map_ordered(run, ((name, load(name)) for name in names), workers=rt.settings.aggregation_workers)
    modules, residuals = {}, {}
    for name, res in zip(names, results):
        modules[name] = (res.A, res.B, res.scaling)
        if res.residual is not None:
            residuals[name] = res.residual
    extras = {}
    for key in sorted({k for d in kept.values() for k in d.extras}):
        holders = [c for c, d in kept.items() if key in d.extras]
        extras[key] = weighted_mean([kept[c].extra(key) for c in holders], [screening.weights[c] for c in holders])
    return modules, residuals, extras, screening


def _output_spec(template: LoraSpec, modules: dict, base_model: str) -> LoraSpec:
    """The first client's layout and task, with the union of modules and the federation's base model."""
    targets = template.target_modules if isinstance(template.target_modules, str) else default_targets(modules)
    return template.replace(target_modules=targets, base_model=base_model, rank_pattern={}, alpha_pattern={})


def _put_artifact(rt: Runtime, federation: str, r: int, path: Path, sha: str | None = None) -> dict:
    sha = sha or _sha256_file(path)
    key = artifact_key(federation, r, path.name, sha)
    try:
        rt.store.put_file(key, path, write_once=True)
    except ObjectExists:
        pass  # content-addressed: the object there is byte-identical
    return {"key": key, "sha256": sha, "size": path.stat().st_size}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _previous_complete(rt: Runtime, federation: str, r: int) -> int | None:
    for prev in range(r - 1, 0, -1):
        if rt.state.round(federation, prev).get("state") == "complete":
            return prev
    return None


def _previous_cumulative(rt: Runtime, federation: str, prev: int | None, tmpdir: Path) -> dict[str, Residual]:
    if prev is None:
        return {}
    manifest = json.loads(rt.store.get_bytes(manifest_key(federation, prev)))
    obj = manifest["objects"]["cumulative_residual.safetensors"]
    path = tmpdir / "previous_cumulative.safetensors"
    rt.store.download(obj["key"], path, expected_sha256=obj["sha256"])
    out = {}
    for name, value in read_residual(path).items():
        out[name] = Residual(left=value[0], right=value[1]) if isinstance(value, tuple) else Residual(dense=value)
    return out
