"""The exactly-once invariants every fault test asserts, in one function: :func:`assert_exactly_once`.

After whatever a test did to the topology, for one federation:

* every event in its stream belongs to it (federations are isolated);
* no accepted delta is lost: every ``delta_accepted`` event, and every upload a client was
  told was accepted, is registered in its round and, once the round is complete, in that
  round's manifest with the same sha256; a round still open holds it as pending;
* each upload takes effect once: no upload id is registered (freshly accepted) twice;
* each round was closed (fired) exactly once and committed exactly once: one close event,
  one ``round_complete`` event, one manifest (its sha256 the one Redis recorded at commit),
  the registered clients and hashes equal to the manifest's, no lease or deadline left
  behind, and no object under the round's prefix besides the manifest and the shard objects
  it names (a rerun wrote the very same bytes, or nothing);
* (the randomized fault schedules, tests/faults/test_fault_schedule.py, add) every record that reached
  an inbox has a verdict and no inbox holds a record, read or not (:func:`assert_every_input_a_verdict`,
  :func:`assert_inboxes_drained`); an ended round leaves no plan, shard, lease or deadline key behind
  (:func:`assert_no_leftover_round_keys`); every round's published update is exact against a float64
  oracle of its inputs, and so is a fresh pull's base correction (:func:`assert_exact_against_oracle`);
* what a user gets is byte-identical to an undisturbed run: a client that pulls every round
  in turn holds, after each, the very same files (``adapter_config.json``,
  ``adapter_model.safetensors``, ``residual.safetensors``, its base correction) as one that
  pulled a reference run of the same rounds (same deltas, same dataset sizes, one shard per
  round) through the production SDK, inbox pump and tasks in this process (fakeredis, a
  file:// store); and a late joiner's pull of the latest round agrees with it (the same
  adapter and residual bytes, the same base correction to float precision).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chorus_mq.adapters import LoraSpec, ModelDecl, read_residual
from chorus_mq.layout import accepted_key, delta_key, manifest_key, round_prefix
from chorus_mq.manifest import Manifest
from chorus_mq.messages import IngestMessage
from chorus_mq.names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ENDED_STATES,
    LOCAL_STATE_FILE,
    MANIFEST_FILE,
    RESIDUAL_FILE,
    CloseReason,
    EventType,
    RoundStatus,
)
from chorus_mq.pulled import iter_correction
from chorus_mq.state import ClientRegistry, EventLog, FederationKeys, Inbox, RoundState

#: the files of a pulled directory that name the federation or its manifest's hash (not the result)
NAMING = (MANIFEST_FILE, LOCAL_STATE_FILE)
#: the round's own result files, the same for a continuing client and a late joiner
RESULT = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESIDUAL_FILE)
CLOSE_REASONS = frozenset(CloseReason.values())


@dataclasses.dataclass(frozen=True)
class Accepted:
    """An upload its client was told was accepted (``UploadResult`` status accepted/duplicate/fired)."""

    client_id: str
    round: int
    sha256: str


@dataclasses.dataclass
class Report:
    complete: dict[int, list[str]]  # round -> clients aggregated
    pending: dict[int, list[str]]  # open round -> clients registered, not aggregated yet
    events: list[dict[str, Any]]
    reclaims: int
    manifests: dict[int, Manifest]


def read_events(redis, federation: str) -> list[dict[str, Any]]:
    """Every event of ``federation``'s stream, oldest first, as published (plus its ``id``)."""
    log = EventLog(redis, federation)
    events: list[dict[str, Any]] = []
    after = "0-0"
    while batch := log.read(after, count=10_000):
        events += [event.to_dict() for event in batch]
        after = batch[-1].id
    return events


def assert_exactly_once(
    dep, federation: str, *, sizes: dict[str, float | None], accepted: list[Accepted] = (), allow_failed: bool = False
) -> Report:
    """Assert every invariant above for ``federation`` of deployment ``dep``; return what was found.

    ``sizes``: each client's dataset size as the test uploaded it (None: not given).
    ``accepted``: what the clients were told. Call once every round expected to finish has.
    """
    redis = dep.redis()
    sdk = dep.sdk()
    store, state = sdk.store, RoundState(redis)
    keys = FederationKeys(federation)
    events = read_events(redis, federation)
    assert events, f"no events for {federation}"
    strangers = [e for e in events if e["federation"] != federation]
    assert not strangers, f"events of other federations in {federation}'s stream: {strangers[:3]}"

    by_round: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        by_round[e["round"]][e["type"]] += 1
    complete: dict[int, list[str]] = {}
    pending: dict[int, list[str]] = {}
    manifests: dict[int, Manifest] = {}
    for r in range(1, state.current_round(federation) + 1):
        info = state.round(federation, r)
        registered = dict(info.shas)
        records = state.deltas(federation, r)
        assert {c: rec.sha256 for c, rec in records.items()} == registered, f"round {r}: deltas vs hashes"
        assert info.n == len(registered), f"round {r}: n={info.n} but {len(registered)} registered"
        fresh = [
            e["client"]
            for e in events
            if e["round"] == r and e["type"] == EventType.DELTA_ACCEPTED and not e.get("duplicate")
        ]
        assert sorted(fresh) == sorted(registered), f"round {r}: first acceptances {fresh} vs {sorted(registered)}"
        closes = [
            e
            for e in events
            if e["round"] == r and e["type"] == EventType.ROUND_AGGREGATING and e.get("reason") in CLOSE_REASONS
        ]
        counts = by_round[r]
        assert info.state != RoundStatus.AGGREGATING, f"round {r} is still aggregating (the test should wait for it)"
        if info.state == RoundStatus.FAILED:
            assert allow_failed, f"round {r} failed: {info.reason}"
            assert counts[EventType.ROUND_COMPLETE] == 0 and counts[EventType.ROUND_FAILED] == 1
            continue
        if info.state in (RoundStatus.OPEN, RoundStatus.EXPIRED):
            assert not closes and counts[EventType.ROUND_COMPLETE] == 0, (
                f"round {r} is {info.state} but was closed: {counts}"
            )
            assert not store.list(round_prefix(federation, r) + "/"), f"round {r} is {info.state} but has results"
            if info.state == RoundStatus.OPEN:
                pending[r] = sorted(registered)
            continue
        assert info.state == RoundStatus.COMPLETE, f"round {r} has state {info.state}"
        assert len(closes) == 1, f"round {r} was closed {len(closes)} times: {closes}"
        assert counts[EventType.ROUND_COMPLETE] == 1, f"round {r} has {counts['round_complete']} round_complete events"
        assert redis.zscore(keys.leases, r) is None and redis.zscore(keys.deadlines, r) is None, (
            f"round {r} is complete but still has a lease or a deadline"
        )
        done = next(e for e in events if e["round"] == r and e["type"] == EventType.ROUND_COMPLETE)
        raw = store.get_bytes(info.manifest)
        digest = hashlib.sha256(raw).hexdigest()
        assert info.manifest_sha256 == digest == done["manifest_sha256"], f"round {r}: manifest hash"
        assert info.manifest == done["manifest"]
        manifest = Manifest.from_json(raw)
        assert (manifest.federation, manifest.round) == (federation, r)
        # a commit run after a reclaim adopts the manifest an earlier epoch wrote (the same result)
        assert 1 <= manifest.epoch <= done["epoch"] == info.epoch, f"round {r}: manifest epoch {manifest.epoch}"
        clients = {c.client_id: c for c in manifest.clients}
        assert {c: m.sha256 for c, m in clients.items()} == registered, f"round {r}: manifest vs registered"
        assert done["clients"] == [c.client_id for c in manifest.clients]
        for c, m in clients.items():
            assert m.dataset_size == sizes[c], f"round {r}: {c} dataset size {m.dataset_size} vs {sizes[c]}"
        assert [s.index for s in manifest.shards] == list(range(len(manifest.shards))), f"round {r}: shard order"
        # exactly one result: the manifest and the objects it names, nothing a second run wrote differently
        named = (
            {info.manifest}
            | {s.adapter.key for s in manifest.shards}
            | {s.residual.key for s in manifest.shards if s.residual is not None}
        )
        listed = set(store.list(round_prefix(federation, r) + "/"))
        assert listed == named, f"round {r}: objects {sorted(listed ^ named)} are not the result's"
        complete[r] = sorted(clients)
        manifests[r] = manifest

    # each upload takes effect once: a redelivered record never registers its delta again elsewhere
    first = collections.Counter(
        e["upload_id"] for e in events if e["type"] == EventType.DELTA_ACCEPTED and not e.get("duplicate")
    )
    assert not [u for u, n in first.items() if n > 1], f"uploads registered more than once: {first.most_common(3)}"
    # no accepted delta lost: every acceptance, as announced and as the clients were told
    told = {(e["client"], e["round"], e["sha256"]) for e in events if e["type"] == EventType.DELTA_ACCEPTED}
    told |= {(a.client_id, a.round, a.sha256) for a in accepted}
    for client, r, sha in sorted(told):
        where = complete.get(r, pending.get(r))
        assert where is not None and client in where, f"accepted delta of {client} in round {r} is lost"
        assert state.registered_sha(federation, r, client) == sha, f"{client} round {r}: registered another sha"
        if r in manifests:
            assert {c.client_id: c.sha256 for c in manifests[r].clients}[client] == sha

    if manifests:
        _assert_reference(dep, federation, manifests, sizes)
    # reclaim.lua's reason: the round's lease ran out and the sweep took it over under a new epoch
    reclaimed = [e for e in events if e["type"] == EventType.ROUND_AGGREGATING and e.get("reason") == "lease_expired"]
    reclaims = len(reclaimed)
    return Report(complete, pending, events, reclaims, manifests)


# -- what a user pulls, against an undisturbed reference run ----------------------------------------

#: (config, declared shapes, rounds) -> what a continuing client pulled after each round (file -> bytes)
_REFERENCE: dict[tuple, list[dict[str, bytes]]] = {}
_DELTAS: dict[str, bytes] = {}  # sha256 -> the delta's bytes (verified), shared by every reference run


def held(out: Path) -> dict[str, bytes]:
    """Every file of a pulled directory (relative path -> bytes) but those naming the federation."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in NAMING
    }


def pull_rounds(sdk, federation: str, rounds: list[int], out: Path) -> list[dict[str, bytes]]:
    """What a continuing client holds after pulling each of ``rounds`` in turn into ``out``."""
    out_held = []
    for r in rounds:
        manifest = sdk.pull(federation, out, r)
        assert manifest.round == r
        out_held.append(held(out))
    return out_held


def _assert_reference(dep, federation: str, manifests: dict[int, Manifest], sizes: dict[str, float | None]) -> None:
    sdk = dep.sdk()
    state = sdk.state
    config = state.config(federation)
    decl = (tuple(sorted(state.modules(federation).items())), tuple(sorted(state.extras(federation).items())))
    rounds = tuple(
        tuple((c.client_id, c.sha256, sizes[c.client_id]) for c in manifests[r].clients) for r in sorted(manifests)
    )
    # round 0 (an initial adapter: the linear strategies' shared factors) is the reference's round 0 too
    initial = _initial(sdk, federation)
    # the reference keeps one shard per round and compacts nothing: neither may change what users get
    key = (dataclasses.replace(config, name="reference", checkpoint_every=0), decl, rounds, initial)
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_run(sdk, federation, key[0], decl, rounds, initial)
    want = _REFERENCE[key]
    with tempfile.TemporaryDirectory() as tmp:
        continuing = Path(tmp) / "continuing"
        got = pull_rounds(sdk, federation, sorted(manifests), continuing)
        for r, have, ref in zip(sorted(manifests), got, want, strict=True):
            assert sorted(have) == sorted(ref), f"round {r}: pulled {sorted(have)} vs the reference's {sorted(ref)}"
            for name in ref:
                assert have[name] == ref[name], f"round {r}: the pulled {name} differs from the undisturbed reference"
        # a late joiner (the latest snapshot, if any, plus the increments after it) gets the same round
        last = max(manifests)
        late = Path(tmp) / "late"
        sdk.pull(federation, late, last)
        for name in RESULT:
            assert (late / name).read_bytes() == want[-1][name], f"round {last}: a late joiner's {name} differs"
        assert_same_correction(late, continuing)


def assert_same_correction(a: Path, b: Path) -> None:
    """Two pulled directories hold the same base correction, module by module (to float32 precision)."""
    ra, rb = dict(iter_correction(a)), dict(iter_correction(b))
    assert sorted(ra) == sorted(rb), f"corrected modules {sorted(ra)} vs {sorted(rb)}"
    for module, residual in ra.items():
        x, y = residual.to_dense().double(), rb[module].to_dense().double()
        scale = max(float(y.abs().max()), 1e-30)
        assert float((x - y).abs().max()) <= 1e-6 * scale, f"{module}: the corrections differ"


def _initial(sdk, federation: str) -> tuple[tuple[str, bytes], ...]:
    """Round 0's pulled adapter files (name, bytes) when the federation published an initial adapter; () else."""
    if sdk.state.latest_complete(federation) is None or not sdk.store.exists(manifest_key(federation, 0)):
        return ()
    with tempfile.TemporaryDirectory() as tmp:
        sdk.pull(federation, Path(tmp), 0)
        return tuple((name, (Path(tmp) / name).read_bytes()) for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))


def _reference_run(dep_sdk, federation: str, config, decl, rounds, initial=()) -> list[dict[str, bytes]]:
    """The same rounds through the production SDK, inbox pump and tasks, undisturbed, in this process (round 0
    from ``initial``, the deployment's round-0 adapter files, when it has one)."""
    from chorus_mq.simulate_synthetic import embedded_sdk
    from chorus_mq.workers import runtime

    torch.set_num_threads(1)
    fed = config.name
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sdk = embedded_sdk(work, allow_unsigned=True)
        adapter = None
        if initial:
            adapter = work / "initial"
            adapter.mkdir()
            for name, data in initial:
                (adapter / name).write_bytes(data)
        try:
            sdk.create_federation(
                dataclasses.replace(config, quorum=10**6, min_quorum=1, round_timeout=0),
                model=ModelDecl(modules=dict(decl[0]), extras=dict(decl[1])),
                initial_adapter=adapter,
            )
            for r, clients in enumerate(rounds, start=1):
                for client, sha, size in clients:
                    if sha not in _DELTAS:  # the bytes the deployment accepted, checked against their hash
                        path = work / f"{sha}.safetensors"
                        dep_sdk.store.download(accepted_key(federation, client, sha), path, expected_sha256=sha)
                        _DELTAS[sha] = path.read_bytes()
                    data = _DELTAS[sha]
                    sdk.store.put_bytes(delta_key(fed, client, sha), data, write_once=False)
                    res = sdk.submit(
                        IngestMessage(
                            federation=fed, round=r, client_id=client, sha256=sha, size=len(data), dataset_size=size
                        ),
                        timeout=60,
                    )
                    assert res.status == "accepted", f"the reference run did not accept {client}: {res}"
                sdk.close_round(fed, r)
                assert sdk.round(fed, r).state == RoundStatus.COMPLETE, f"reference round {r}: {sdk.round(fed, r)}"
            return pull_rounds(sdk, fed, list(range(1, len(rounds) + 1)), work / "pulled")
        finally:
            runtime.install(None)


# -- every input a verdict, nothing left pending, exact against a float64 oracle ---------------------

F64 = torch.float64


def verdicts(redis, federation: str) -> dict[str, dict[str, Any]]:
    """upload id -> its verdict event: ``delta_accepted`` (fresh or a duplicate) or ``delta_rejected``."""
    kinds = (EventType.DELTA_ACCEPTED, EventType.DELTA_REJECTED)
    return {e["upload_id"]: e for e in read_events(redis, federation) if e["type"] in kinds and e.get("upload_id")}


def assert_every_input_a_verdict(redis, federation: str, upload_ids: list[str]) -> None:
    """Every record whose XADD returned (``upload_ids``) has a verdict event in ``federation``'s stream."""
    found = verdicts(redis, federation)
    missing = [u for u in upload_ids if u not in found]
    assert not missing, f"{len(missing)} of {len(upload_ids)} records that reached an inbox have no verdict: {missing}"


def assert_inboxes_drained(redis, federation: str) -> None:
    """No inbox of ``federation`` (the shared one, every registered client's) holds a record, read or not:
    XLEN 0 and nothing pending in the consumer group."""
    inboxes = [Inbox(redis, federation)]
    inboxes += [Inbox(redis, federation, info.client_id) for info in ClientRegistry(redis, federation).list()]
    left = {i.key: {"xlen": i.length(), "pending": i.pending()} for i in inboxes}
    left = {key: n for key, n in left.items() if n["xlen"] or n["pending"]}
    assert not left, f"inboxes still holding records: {left}"


def assert_no_leftover_round_keys(redis, federation: str) -> None:
    """An ended round (complete, failed, expired, aborted) leaves no plan, shard results, lease or deadline."""
    state, keys = RoundState(redis), FederationKeys(federation)
    left = {}
    for r in range(1, state.current_round(federation) + 1):
        if state.round(federation, r).state not in ENDED_STATES:
            continue
        found = [k for k in (keys.plan(r), keys.shards(r)) if redis.exists(k)]
        found += [f"{k}[{r}]" for k in (keys.leases, keys.deadlines) if redis.zscore(k, r) is not None]
        if found:
            left[r] = found
    assert not left, f"ended rounds still holding keys: {left}"


def _products(tensors: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """module -> ``s·B·A`` in float64, from peft-named factors."""
    out = {}
    for name, A in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            B = tensors[f"{module}.lora_B.weight"]
            out[module] = spec.scaling(module, A.shape[0]) * (B.to(F64) @ A.to(F64))
    return out


def _input_products(path: Path) -> dict[str, torch.Tensor]:
    """``s·B·A`` of a client's delta file (its adapter_config embedded in the safetensors header)."""
    with safe_open(path, "pt") as f:
        spec = LoraSpec.from_peft_config(json.loads(f.metadata()["adapter_config"]))
    return _products(load_file(path), spec)


def _pulled_products(out: Path) -> dict[str, torch.Tensor]:
    spec = LoraSpec.from_peft_config(json.loads((out / ADAPTER_CONFIG).read_text()))
    return _products(load_file(out / ADAPTER_WEIGHTS), spec)


def _rel(x: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    return float((x - ref).norm()) / max(scale, 1e-30)


def assert_exact_against_oracle(
    dep,
    federation: str,
    manifests: dict[int, Manifest],
    inputs: dict[tuple[str, int], Path],
    sizes: dict[str, float],
    *,
    tol: float = 1e-5,
) -> None:
    """A fresh pull of every complete round is exact against a float64 oracle of what was uploaded.

    ``inputs``: (client, round) -> the delta file it uploaded. For round r, with weights proportional to
    the dataset sizes, ``M_r = Σ wᵢ sᵢ Bᵢ Aᵢ`` (float64, from the files); the pulled adapter's ``s·B·A``
    plus the round's residual equals ``M_r``, and the pull's base correction equals the sum over rounds
    t ≤ r of ``M_t − s·B_t·A_t``, both to ``tol`` relative to the updates' norms.
    """
    sdk = dep.sdk()
    want_correction: dict[str, torch.Tensor] = {}
    scale = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in sorted(manifests):
            clients = [c.client_id for c in manifests[r].clients]
            total = math.fsum(sizes[c] for c in clients)
            oracle: dict[str, torch.Tensor] = {}
            for c in clients:
                for module, product in _input_products(inputs[(c, r)]).items():
                    oracle[module] = oracle.get(module, torch.zeros_like(product)) + sizes[c] / total * product
            out = Path(tmp) / f"fresh-{r}"  # a fresh pull of round r: a late joiner's
            sdk.pull(federation, out, r)
            adapter = _pulled_products(out)
            residual = {m: res.to_dense().to(F64) for m, res in read_residual(out / RESIDUAL_FILE).items()}
            assert sorted(adapter) == sorted(oracle), f"round {r}: modules {sorted(adapter)} vs {sorted(oracle)}"
            for module, m in oracle.items():
                got = adapter[module] + residual.get(module, torch.zeros_like(m))
                err = _rel(got, m, float(m.norm()))
                assert err <= tol, f"round {r} {module}: adapter + residual is {err:.2e} from the float64 oracle"
                want_correction[module] = want_correction.get(module, torch.zeros_like(m)) + m - adapter[module]
                scale = max(scale, float(m.norm()))
            correction = {m: res.to_dense().to(F64) for m, res in iter_correction(out)}
            for module, want in want_correction.items():
                err = _rel(correction.get(module, torch.zeros_like(want)), want, scale)
                assert err <= tol, f"round {r} {module}: a fresh pull's correction is {err:.2e} from the oracle"
