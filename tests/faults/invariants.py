"""The exactly-once invariants every fault test asserts, in one function: :func:`assert_exactly_once`.

After whatever a test did to the topology, for one federation:

* every event in its stream belongs to it (federations are isolated);
* no accepted delta is lost: every ``delta_accepted`` event, and every upload a client was
  told was accepted, is registered in its round and, once the round is complete, in that
  round's manifest with the same sha256; a round still open holds it as pending;
* each upload takes effect once: no upload id is registered (freshly accepted) twice;
* each round was closed (fired) exactly once and aggregated into exactly one result: one
  ``round_complete`` event, one manifest (the only ``manifest.json`` under the round's prefix,
  and no result object besides the ones it names), round hash ``complete`` with the
  manifest's key and sha256, the registered clients and hashes equal to the manifest's;
* the result is byte-identical to an undisturbed run: the sha256 of every result object
  (adapter, residual, cumulative residual, config) equals that of a reference run of the
  same rounds (same deltas, same dataset sizes), computed in this process by the production
  ingest and aggregation code on an in-memory Redis and a file:// store.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import fakeredis

from chorus_mq.layout import delta_key, manifest_key, round_prefix
from chorus_mq.messages import IngestMessage
from chorus_mq.settings import Settings
from chorus_mq.state import EventLog, FederationKeys, RoundState
from chorus_mq.store import open_store
from chorus_mq.workers.aggregate import RESULT_FILES, aggregate_round
from chorus_mq.workers.ingest import ingest
from chorus_mq.workers.runtime import Runtime

#: the round-closing reasons of a ``round_aggregating`` event (a reclaim's reason is lease_expired)
CLOSE_REASONS = ("quorum", "deadline", "manual")


@dataclasses.dataclass(frozen=True)
class Accepted:
    """An upload its client was told was accepted (``UploadResult`` status accepted/duplicate)."""

    client_id: str
    round: int
    sha256: str


@dataclasses.dataclass
class Report:
    complete: dict[int, list[str]]  # round -> clients aggregated
    pending: dict[int, list[str]]  # open round -> clients registered, not aggregated yet
    events: list[dict]
    reclaims: int


def read_events(redis, federation: str) -> list[dict]:
    log = EventLog(redis, federation)
    events, after = [], "0-0"
    while batch := log.read(after, count=10_000):
        events += [{"id": entry_id, **event} for entry_id, event in batch]
        after = batch[-1][0]
    return events


def assert_exactly_once(dep, federation: str, *, sizes: dict[str, float | None],
                        accepted: list[Accepted] = (), allow_failed: bool = False) -> Report:
    """Assert every invariant above for ``federation`` of deployment ``dep``; return what was found.

    ``sizes``: each client's dataset size as the test uploaded it (None: not given).
    ``accepted``: what the clients were told. Call once every round expected to finish has.
    """
    redis = dep.redis()
    store = dep.sdk().store
    state = RoundState(redis)
    events = read_events(redis, federation)
    assert events, f"no events for {federation}"
    strangers = [e for e in events if e.get("federation") != federation]
    assert not strangers, f"events of other federations in {federation}'s stream: {strangers[:3]}"

    by_round: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        by_round[e["round"]][e["type"]] += 1
    current = state.current_round(federation)
    complete: dict[int, list[str]] = {}
    pending: dict[int, list[str]] = {}
    manifests: dict[int, dict] = {}
    for r in range(1, current + 1):
        info = state.round(federation, r)
        raw = redis.hgetall(FederationKeys(federation).round(r))
        registered = {k.removeprefix("sha:"): v for k, v in raw.items() if k.startswith("sha:")}
        records = state.deltas(federation, r)
        assert {c: rec["sha256"] for c, rec in records.items()} == registered, f"round {r}: deltas vs hashes"
        assert info["n"] == len(registered), f"round {r}: n={info['n']} but {len(registered)} registered"
        fresh = [e for e in events if e["round"] == r and e["type"] == "delta_accepted" and not e.get("duplicate")]
        assert sorted(e["client"] for e in fresh) == sorted(registered), \
            f"round {r}: first acceptances {sorted(e['client'] for e in fresh)} vs registered {sorted(registered)}"
        closes = [e for e in events if e["round"] == r and e["type"] == "round_aggregating"
                  and e.get("reason") in CLOSE_REASONS]
        counts = by_round[r]
        state_ = info["state"]
        assert state_ != "aggregating", f"round {r} is still aggregating (the test should wait for it)"
        if state_ == "failed":
            assert allow_failed, f"round {r} failed: {info.get('reason')}"
            assert counts["round_complete"] == 0 and counts["round_failed"] == 1
            continue
        if state_ in ("open", "expired"):
            assert not closes and counts["round_complete"] == 0, f"round {r} is {state_} but was closed: {counts}"
            assert not store.exists(manifest_key(federation, r)), f"round {r} is {state_} but has a manifest"
            if state_ == "open":
                pending[r] = sorted(registered)
            continue
        assert state_ == "complete", f"round {r} has state {state_}"
        assert len(closes) == 1, f"round {r} was closed {len(closes)} times: {closes}"
        assert counts["round_complete"] == 1, f"round {r} has {counts['round_complete']} round_complete events"
        done = next(e for e in events if e["round"] == r and e["type"] == "round_complete")
        key = manifest_key(federation, r)
        assert info["manifest"] == key
        manifest_bytes = store.get_bytes(key)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        assert info["manifest_sha256"] == digest == done["manifest_sha256"], f"round {r}: manifest hash"
        manifest = json.loads(manifest_bytes)
        assert (manifest["federation"], manifest["round"]) == (federation, r)
        clients = {c["client_id"]: c for c in manifest["clients"]}
        assert {c: m["sha256"] for c, m in clients.items()} == registered, f"round {r}: manifest vs registered"
        assert done["clients"] == [c["client_id"] for c in manifest["clients"]]
        for c, m in clients.items():
            assert m["dataset_size"] == sizes[c], f"round {r}: {c} dataset size {m['dataset_size']} vs {sizes[c]}"
        # exactly one result: the manifest and the objects it names, nothing a second run wrote differently
        expected_keys = {key} | {obj["key"] for obj in manifest["objects"].values()}
        listed = set(store.list(round_prefix(federation, r) + "/"))
        assert listed == expected_keys, f"round {r}: objects {sorted(listed ^ expected_keys)} are not the result's"
        complete[r] = sorted(clients)
        manifests[r] = manifest

    # each upload takes effect once: a redelivered message never registers its delta again elsewhere
    first = collections.Counter(e["upload_id"] for e in events if e["type"] == "delta_accepted"
                                and not e.get("duplicate"))
    assert not [u for u, n in first.items() if n > 1], f"uploads registered more than once: {first.most_common(3)}"
    # no accepted delta lost: every acceptance, as announced and as the clients were told
    told = {(e["client"], e["round"], e["sha256"]) for e in events if e["type"] == "delta_accepted"}
    told |= {(a.client_id, a.round, a.sha256) for a in accepted}
    for client, r, sha in sorted(told):
        where = complete.get(r, pending.get(r))
        assert where is not None and client in where, f"accepted delta of {client} in round {r} is lost"
        assert state.registered_sha(federation, r, client) == sha, f"{client} round {r}: registered another sha"
        if r in manifests:
            assert {c["client_id"]: c["sha256"] for c in manifests[r]["clients"]}[client] == sha

    _assert_reference(dep, federation, manifests, sizes)
    reclaims = sum(1 for e in events if e["type"] == "round_aggregating" and e.get("reason") == "lease_expired")
    return Report(complete, pending, events, reclaims)


# -- the undisturbed reference run ---------------------------------------------------------

_REFERENCE: dict[tuple, list[dict[str, str]]] = {}
_DELTAS: dict[str, bytes] = {}  # sha256 -> the delta's bytes (verified), shared by every reference run


def _assert_reference(dep, federation: str, manifests: dict[int, dict], sizes: dict[str, float | None]) -> None:
    if not manifests:
        return
    config = RoundState(dep.redis()).config(federation)
    rounds = tuple(tuple((c["client_id"], c["sha256"], sizes[c["client_id"]]) for c in manifests[r]["clients"])
                   for r in sorted(manifests))
    key = (dataclasses.replace(config, name=federation), rounds)
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_run(dep, config, rounds)
    for (r, manifest), want in zip(sorted(manifests.items()), _REFERENCE[key]):
        got = {name: manifest["objects"][name]["sha256"] for name in RESULT_FILES}
        assert got == want, f"round {r} differs from the undisturbed reference run: {got} != {want}"


def _reference_run(dep, config, rounds) -> list[dict[str, str]]:
    """The same rounds through the production ingest and aggregation code, undisturbed, in-process."""
    real_store = dep.sdk().store
    fed = config.name
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(store=f"file://{tmp}/store", spool_dir=f"{tmp}/spool", allow_unsigned=True)
        rt = Runtime(settings, fakeredis.FakeRedis(decode_responses=True), open_store(settings.store, settings))
        rt.state.create_federation(dataclasses.replace(config, quorum=10**6, min_quorum=1, round_timeout=0))
        out = []
        for r, clients in enumerate(rounds, start=1):
            for client, sha, size in clients:
                if sha not in _DELTAS:  # the bytes the client uploaded
                    path = Path(tmp) / f"{sha}.safetensors"
                    real_store.download(delta_key(fed, client, sha), path, expected_sha256=sha)
                    _DELTAS[sha] = path.read_bytes()
                rt.store.put_bytes(delta_key(fed, client, sha), _DELTAS[sha], write_once=False)
                msg = IngestMessage(federation=fed, round=r, client_id=client, object_key=delta_key(fed, client, sha),
                                    sha256=sha, size=len(_DELTAS[sha]), dataset_size=size)
                verdict = ingest(rt, msg.model_dump(), lambda *a: None)
                assert verdict.accepted, f"reference run rejected {client}: {verdict.reason}"
            fired = rt.state.close(fed, r, "manual")
            assert fired.status == "fired", fired
            assert aggregate_round(rt, fed, r, fired.epoch) == "ok"
            manifest = json.loads(rt.store.get_bytes(manifest_key(fed, r)))
            out.append({name: manifest["objects"][name]["sha256"] for name in RESULT_FILES})
    return out
