"""Secure aggregation in rounds, over real services: redis-server, moto S3, a worker and a beat subprocess;
the federation created by the CLI (``--secure-aggregation``), clients driven through the SDK
(``ChorusClient.secure_round``) in threads. The published adapter is the round's frozen A bit for bit and
the float64 oracle's weighted mean of the summed clients' B (and head) to 1e-5; dropouts before and after
the masked input leave the exact sum of the others, named in the manifest; a hostile client's unsigned and
wrong-length shares are refused with their reasons and the round is unharmed. Fed-SB's secure rounds mask R (and
the head) only, publish the exact mean R and refer to round 0's frame."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load

from chorus_mq.names import SecAggPhase
from chorus_mq.results import fetch_manifest
from chorus_mq.secagg import wire
from chorus_mq.secagg.public import RoundPublic
from chorus_mq.state import FederationKeys
from chorus_mq.state.inbox import Inbox
from chorus_mq.state.secagg import SecAggRounds

from ..services import wait_for
from .clients import Clients, run_clients, train_all
from .secure_rounds import (
    F64,
    FROZEN,
    Stop,
    check_exact,
    create_secure,
    create_secure_federation,
    fetch_published,
    random_update,
    round_public,
    secure_clients,
)

pytestmark = [pytest.mark.e2e, pytest.mark.services]


def test_secure_ffa_federation_two_rounds_exact(deployment, tiny_bert_dir):
    torch.set_num_threads(1)
    fed = "sec"
    clients = [f"c{i}" for i in range(4)]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients)
    operator = deployment.sdk()
    for r in (1, 2):
        pub = round_public(operator, fed, r)
        assert pub.cohort == tuple(clients) and pub.trainable == "lora_B"
        assert pub.neighbours == 3 and pub.threshold == 2  # N = 4: every other client, T = K/2 + 1
        updates = {c: random_update(pub, 100 * r + i) for i, c in enumerate(clients)}
        phases: dict[str, list[str]] = {c: [] for c in clients}

        def on_phase(c: str, phase: str, phases=phases) -> None:
            phases[c].append(phase)

        results = secure_clients(deployment, fed, secrets, updates, round_=r, on_phase=on_phase).join()
        assert all(c in res.summed for c, res in results.items()), results
        every = ["advertise", "share", "masked_input", "unmask", "done"]
        closed_by = operator.redis.hget(FederationKeys(fed).secagg(r), "unmask_closed_by")
        # a slow client may find the unmask phase already closed 'enough' (three answers removed every mask)
        skipped = [p for p in every if p != "unmask"]
        assert all(p == every or (p == skipped and closed_by == "enough") for p in phases.values()), phases
        manifest = check_exact(operator, fed, r, pub, updates, clients)
        assert manifest.secure["dropped"] == {}
        assert operator.state.round(fed, r).state == "complete"
    # every phase change is an event
    events = [e for e in operator.state.events(fed).read() if e.type == "secagg_phase"]
    in_round_1 = [e.fields["phase"] for e in events if e.round == 1]
    assert in_round_1 == ["advertise", "share", "masked_input", "unmask", "done"]
    # status says what the open round's secure aggregation is at, and what it published
    wait_for(lambda: operator.status(fed).secure.get("round"), 30, "round 3's secure aggregation to open")
    status = json.loads(deployment.cli("status", "-f", fed, "--json").stdout)
    assert status["current_round"] == 3 and status["secure"]["phase_timeout"] == 300
    now = status["secure"]["round"]
    assert now["phase"] == "advertise" and now["cohort"] == clients and now["neighbours"] == 3
    assert now["weights"] == dict.fromkeys(clients, 0.25) and now["trainable"] == "lora_B"
    assert "secure aggregation: phase advertise, cohort 4, K 3, T 2" in deployment.cli("status", "-f", fed).stdout


def test_dropouts_and_a_hostile_client_leave_the_exact_sum_of_the_others(deployment, tiny_bert_dir):
    torch.set_num_threads(1)
    fed = "secdrop"
    clients = [f"c{i}" for i in range(6)]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients, "--secagg-phase-timeout", "4")
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    assert (pub.neighbours, pub.threshold) == (5, 3)  # two of any client's neighbours may drop
    updates = {c: random_update(pub, i) for i, c in enumerate(clients)}
    # c4 falls silent before its masked input (at the share phase, where it sends two hostile records instead);
    # c5 after it: it never answers the unmask request, and its input is summed all the same
    silent_at = {"c4": "share", "c5": "unmask"}

    def hostile(c: str) -> None:
        if c == "c4":  # the hostile part: an unsigned share and a wrong-length one, both refused
            redis = deployment.redis()
            good = {"sealed": {}, "seed_commitment": wire.b64(b"x" * 32)}
            unsigned = wire.PhaseRecord(fed, 1, c, SecAggPhase.SHARE, good).signed("not-the-secret-0123456789")
            short = {"sealed": {"c0": wire.b64(b"y" * 10)}, "seed_commitment": wire.b64(b"x" * 32)}
            wrong = wire.PhaseRecord(fed, 1, c, SecAggPhase.SHARE, short).signed(secrets[c])
            for rec in (unsigned, wrong):
                Inbox(redis, fed, c).append(rec.to_json())

    secure_clients(deployment, fed, secrets, updates, silent_at=silent_at, on_stop=hostile).join()
    wait_for(lambda: operator.state.round(fed, 1).state == "complete", 60, "round 1 to complete")
    summed = ["c0", "c1", "c2", "c3", "c5"]
    manifest = check_exact(operator, fed, 1, pub, updates, summed)
    assert manifest.secure["dropped"] == {"c4": "share"}, manifest.secure
    assert [c.client_id for c in manifest.clients] == summed
    events = operator.state.events(fed).read()
    rejected = [e for e in events if e.type == "delta_rejected" and e.fields["client"] == "c4"]
    # the first rejection is published; the repeat (same client, round and code) is counted, its verdict kept
    assert len(rejected) == 1 and "signature does not verify" in rejected[0].fields["reason"], rejected
    assert rejected[0].fields["code"] == "secagg_peer"
    verdicts = operator.redis.hgetall(FederationKeys(fed).rejections(1))
    assert "is 10 bytes, not" in json.loads(verdicts["last:c4"])["reason"], verdicts
    assert int(verdicts["c4|secagg_peer"]) >= 1
    assert operator.state.round(fed, 2).state == "open"

    # the sharded unmask equals the whole one: re-summing every stored response and masked input at once (the
    # done state, as when the phase closed) gives the published bytes; a repeated commit is a no-op
    from chorus_mq.state.secagg_flow import replay
    from chorus_mq.workers import secure, secure_sum
    from chorus_mq.workers.runtime import Runtime

    assert len(manifest.shards) > 1, manifest.shards  # CHORUS_SHARD_BYTES: one tensor a shard
    rt = Runtime(deployment.settings(), operator.redis, operator.store)
    params = pub.params(fed, 1)
    again = replay(secure.rounds_of(rt, fed), 1, params, secure.stored_loader(rt, fed, params)).finish()
    assert list(again.summed) == summed
    _, got = fetch_published(operator, fed, 1)
    total = sum(pub.weights[c] for c in summed)
    for key, value in pub.layout.unflatten(again.total / total).items():
        assert torch.equal(torch.from_numpy(value).to(torch.float32), got[key]), key
    assert secure_sum.commit_secure(rt, fed, 1, operator.state.round(fed, 1).epoch) == "already"


def test_a_client_silent_at_unmask_closes_the_phase_long_before_its_deadline(deployment, tiny_bert_dir):
    """c3 sends its masked input and never answers the unmask request. The three answers already reconstruct every
    self-mask seed (K = 3, T = 2: each answering client's seed has the two other answers' shares, c3's three), so
    the phase closes 'enough' at once rather than at its 120 s deadline, and c3's input is summed all the same."""
    torch.set_num_threads(1)
    fed = "secenough"
    clients = [f"c{i}" for i in range(4)]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients, "--secagg-phase-timeout", "120")
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    assert (pub.neighbours, pub.threshold) == (3, 2)
    updates = {c: random_update(pub, 80 + i) for i, c in enumerate(clients)}
    unmask_at: list[float] = []

    def on_phase(_c: str, phase: str) -> None:
        if phase == "unmask":
            unmask_at.append(time.monotonic())

    results = secure_clients(deployment, fed, secrets, updates, silent_at={"c3": "unmask"}, on_phase=on_phase).join()
    waited = time.monotonic() - min(unmask_at)
    assert results["c3"] is None and all("c3" in results[c].summed for c in ("c0", "c1", "c2")), results
    assert waited < 30, waited  # the deadline is 120 s away
    manifest = check_exact(operator, fed, 1, pub, updates, clients)
    assert manifest.secure["dropped"] == {}
    closed = [e for e in operator.state.events(fed).read() if e.type == "secagg_phase" and e.fields["phase"] == "done"]
    assert [(e.round, e.fields["closed_by"]) for e in closed] == [(1, "enough")]


def test_secure_fed_sb_round_masks_r_only_and_publishes_the_exact_mean_r(deployment, tiny_bert_dir, tmp_path):
    """A secure fed-sb round: the masked vector is every module's R and the head, never the frozen frame; c3 falls
    silent before its masked input (its pairwise masks are recovered from the others' shares); the round publishes
    the exact weighted mean R of the other three (the plain round's average, to the float64 oracle), stores R and
    the head only, refers to round 0's frame, and pulls as a standard PEFT adapter (lora_B = B R, lora_A = A)."""
    from safetensors.torch import load_file

    from chorus_mq.names import ADAPTER_WEIGHTS

    torch.set_num_threads(1)
    fed = "secsb"
    clients = ["c0", "c1", "c2", "c3"]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients, "--secagg-phase-timeout", "3", strategy="fed-sb")
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    assert pub.trainable == "lora_R" and pub.start == 0
    keys = [k for k, _ in pub.layout.entries]
    r_keys = [k for k in keys if k.endswith(".lora_R.weight")]
    assert r_keys and all(shape == (4, 4) for k, shape in pub.layout.entries if k in r_keys)
    assert not any(".lora_A." in k or ".lora_B." in k for k in keys)  # the frame is never masked
    assert set(keys) - set(r_keys)  # the task head is
    updates = {c: random_update(pub, 80 + i) for i, c in enumerate(clients)}
    results = secure_clients(deployment, fed, secrets, updates, silent_at={"c3": "masked_input"}).join()
    summed = ["c0", "c1", "c2"]
    assert all(results[c].summed == tuple(summed) for c in summed), results
    manifest = check_exact(operator, fed, 1, pub, updates, summed)
    assert manifest.secure["dropped"] == {"c3": "masked_input"} and manifest.secure["trainable"] == "lora_R"
    # the round stored R and the head only; its frame is round 0's objects
    start, _ = fetch_manifest(operator.state, operator.store, fed, 0)
    assert manifest.frame is not None and manifest.frame.round == 0
    assert [s.adapter for s in manifest.frame.shards] == [s.adapter for s in start.shards]
    stored = {k for s in manifest.shards for k in load(operator.store.get_bytes(s.adapter.key))}
    assert stored == set(keys) and len(manifest.shards) > 1
    # pulled: the standard PEFT adapter of the exact update s B R A, R the oracle's weighted mean
    _, frame = fetch_published(operator, fed, 0)
    out = tmp_path / "pulled"
    operator.pull(fed, out, 1)
    peft = load_file(out / ADAPTER_WEIGHTS)
    assert not any(k.endswith(".lora_R.weight") for k in peft)
    total = sum(pub.weights[c] for c in summed)
    for key in r_keys:
        m = key.removesuffix(".lora_R.weight")
        b, a = frame[f"{m}.lora_B.weight"].to(F64), frame[f"{m}.lora_A.weight"].to(F64)
        want = b @ (sum(updates[c][key].to(F64) * pub.weights[c] for c in summed) / total) @ a
        got = peft[f"{m}.lora_B.weight"].to(F64) @ peft[f"{m}.lora_A.weight"].to(F64)
        assert float((got - want).norm() / want.norm()) <= 1e-5, m
        assert torch.equal(peft[f"{m}.lora_A.weight"], frame[f"{m}.lora_A.weight"])


def test_cli_upload_drives_the_phases(deployment, tiny_bert_dir, tmp_path):
    """``chorus-mq upload`` processes, one per client, each a PEFT adapter (round 0's, B and head moved): each
    stays up through the phases, prints them, and ends ``summed``; the round is exact against the files."""
    from safetensors.torch import load_file, save_file

    from chorus_mq.names import ADAPTER_WEIGHTS

    torch.set_num_threads(1)
    fed = "seccli"
    clients = ["c0", "c1", "c2"]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients)
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    start = tmp_path / "start"
    operator.pull(fed, start, round_=0)
    updates: dict[str, dict[str, torch.Tensor]] = {}
    procs = {}
    for i, c in enumerate(clients):
        tensors = load_file(str(start / ADAPTER_WEIGHTS))
        moved = random_update(pub, 7 + i)
        for key in moved:  # the layout's keys are the adapter's own (PEFT names)
            assert key in tensors, key
        tensors.update(moved)
        updates[c] = moved
        mine = tmp_path / c
        mine.mkdir()
        save_file(tensors, str(mine / ADAPTER_WEIGHTS))
        (mine / "adapter_config.json").write_text((start / "adapter_config.json").read_text())
        procs[c] = deployment.popen_cli(
            "upload", "-f", fed, "--adapter", str(mine), "--client-id", c, "--timeout", "120",
            "--secagg-state-dir", str(tmp_path / f"keys-{c}"),
            env={"CHORUS_CLIENT_SECRET": secrets[c]},
        )  # fmt: skip
    for c, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (c, out, err)
        assert f"summed: {c} in secure round 1 (3 inputs summed)" in out, out
        for phase in ("advertise", "share", "masked_input", "unmask", "done"):
            assert f"secagg_phase: round 1 {phase}" in out, out
        assert not list((tmp_path / f"keys-{c}").glob("secagg-*.json"))  # the round's keys are gone once it published
    check_exact(operator, fed, 1, pub, updates, clients)


def test_a_restarted_client_resumes_its_round_from_its_keys_on_disk(deployment, tiny_bert_dir, tmp_path):
    """A client that stops after sharing its keys (a crash) and runs again with the same state dir sends its
    masked input with the keys it shared, and the round completes with everyone, exactly."""
    torch.set_num_threads(1)
    fed = "secresume"
    clients = ["c0", "c1", "c2"]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients)
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    updates = {c: random_update(pub, 40 + i) for i, c in enumerate(clients)}
    crashed = threading.Event()

    def run(c: str) -> None:
        sdk = deployment.sdk(client_secret=secrets[c])
        keys = tmp_path / f"keys-{c}"

        def crash(_r: int, phase: str) -> None:
            if c == "c0" and phase == "masked_input" and not crashed.is_set():
                crashed.set()
                raise Stop(phase)

        try:
            sdk.secure_round(fed, c, updates[c], round_=1, timeout=120, poll=0.05, state_dir=keys, on_phase=crash)
        except Stop:
            assert list(keys.glob("secagg-*.json")), "the keys of the phases sent are on disk"
            again = deployment.sdk(client_secret=secrets[c])  # a new process, as after a restart
            res = again.secure_round(fed, c, updates[c], round_=1, timeout=120, poll=0.05, state_dir=keys)
            assert c in res.summed

    run_clients(run, clients)
    assert crashed.is_set()
    manifest = check_exact(operator, fed, 1, pub, updates, clients)
    assert manifest.secure["dropped"] == {}


@pytest.mark.parametrize(
    ("strategy", "trains"),
    [("rolora", ("lora_B", "lora_A")), ("fed-sb", ("lora_R", "lora_R"))],
    ids=["rolora", "fed-sb"],
)
def test_train_runs_secure_rounds(deployment, tiny_bert_dir, tmp_path, strategy, trains):
    """``train`` (the SDK's driver, as ``chorus-mq train`` runs it) on a secure federation: three clients, two
    rounds (rolora: B, then A; fed-sb: R both times, uploads of lora_R only); each round publishes its frozen
    factors bit for bit and the exact weighted mean of the trained one the clients uploaded (their adapters kept
    in the work dirs)."""
    from chorus_mq.training.data import Examples

    from .test_local import WORDS

    torch.set_num_threads(1)
    fed = "sectrain" + strategy.replace("-", "")
    clients = ["c0", "c1", "c2"]
    deployment.start_worker(concurrency=1)
    deployment.start_beat(env={"CHORUS_SWEEP_INTERVAL": "0.2"})
    create_secure_federation(deployment, tiny_bert_dir, fed, quorum=3, strategy=strategy)
    operator = deployment.sdk()
    secrets = {c: operator.add_client(fed, c).secret for c in clients}

    def data(c: str) -> Examples:
        owner = int(c[1])
        labels = [(owner + i) % 3 for i in range(12)]
        texts = tuple(f"the film was {WORDS[y]} overall, client {owner} {i}" for i, y in enumerate(labels))
        return Examples(texts, tuple(labels))

    records = train_all(
        deployment, fed, secrets, data, tmp_path, model_dir=tiny_bert_dir,
        rounds=2, steps_per_round=2, batch_size=6, lr=5e-2, max_length=24,
    )  # fmt: skip
    assert all(record.upload == "summed" for c in clients for record in records[c]), records
    _, previous = fetch_published(operator, fed, 0)
    for r, trained in enumerate(trains, start=1):
        manifest, got = fetch_published(operator, fed, r)
        assert manifest.secure["summed"] == clients and manifest.secure["trainable"] == trained
        frozen = tuple(f".{f}.weight" for f in FROZEN[trained])
        assert any(key.endswith(frozen) for key in got)
        for key in got:
            if key.endswith(frozen):
                assert torch.equal(got[key], previous[key]), key
            elif key.endswith(f".{trained}.weight"):
                assert not torch.equal(got[key], previous[key]), key
        previous = got
    # round 2: exact against the adapters the clients uploaded (kept in their work dirs)
    from chorus_mq.adapters import load_adapter

    pub = RoundPublic.from_dict(SecAggRounds(operator.redis, fed).public_params(2))
    uploads = {}
    for c in clients:
        (path,) = [p.parent for p in (tmp_path / c / "rounds" / "000002").rglob("adapter_config.json")]
        uploads[c] = {k: t.to(torch.float32) for k, t in load_adapter(path).tensors.items()}
    check_exact(operator, fed, 2, pub, uploads, clients)


def test_dp_secure_round_clips_on_clients_and_noises_the_sum(deployment, tiny_bert_dir):
    """--clip-norm and --dp-noise-multiplier with secure aggregation: each client clips its flattened input before
    weighting and masking it; the workers add N(0, (z C max w)^2) to the unmasked sum; status reports epsilon."""
    import numpy as np

    torch.set_num_threads(1)
    fed = "secdp"
    clients = ["c0", "c1", "c2"]
    dp = ("--clip-norm", "0.05", "--dp-noise-multiplier", "0.5")
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients, *dp)
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    assert (pub.clip_norm, pub.noise_multiplier) == (0.05, 0.5)
    updates = {c: random_update(pub, 90 + i) for i, c in enumerate(clients)}  # norms far above 0.05: every one clipped
    secure_clients(deployment, fed, secrets, updates).join()
    manifest, got = fetch_published(operator, fed, 1)
    sigma = 0.5 * 0.05 * max(pub.weights.values())
    assert manifest.dp is not None and manifest.dp["sigma"] == pytest.approx(sigma)
    clipped = sum(pub.client_input(c, pub.layout.flatten(updates[c])).astype(np.float64) for c in clients)
    published = pub.layout.flatten({k: got[k] for k, _ in pub.layout.entries})
    noise = published - clipped / sum(pub.weights.values())
    assert noise.shape[0] >= 500 and abs(noise.mean()) < 5 * sigma / noise.shape[0] ** 0.5
    assert abs(noise.std() / sigma - 1) < 0.15, (noise.std(), sigma)
    privacy = operator.status(fed).privacy
    assert set(privacy) == set(clients) and all(p["rounds"] == 1 and p["epsilon"] > 0 for p in privacy.values())


def test_a_client_silent_at_the_advertise_phase_is_left_out_and_named(deployment, tiny_bert_dir):
    """c3 never advertises keys: the advertise phase closes at its deadline without it, nobody shares with it, and
    the round publishes the exact sum of the other three, its manifest naming c3 dropped at ``advertise``."""
    torch.set_num_threads(1)
    fed = "secadv"
    clients = ["c0", "c1", "c2", "c3"]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients, "--secagg-phase-timeout", "3")
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    updates = {c: random_update(pub, 60 + i) for i, c in enumerate(clients)}
    results = secure_clients(deployment, fed, secrets, updates, silent_at={"c3": "advertise"}).join()
    summed = ["c0", "c1", "c2"]
    assert all(results[c].summed == tuple(summed) for c in summed), results
    manifest = check_exact(operator, fed, 1, pub, updates, summed)
    assert manifest.secure["dropped"] == {"c3": "advertise"}, manifest.secure
    assert [c.client_id for c in manifest.clients] == summed and len(manifest.shards) > 1
    rounds = SecAggRounds(operator.redis, fed)
    assert rounds.submissions(1, SecAggPhase.ADVERTISE).keys() == set(summed)
    assert not any(f.startswith("share:c3") for c in summed for f in rounds.delivered(1, c))  # nobody shared with c3


def _unmask_records(redis, fed: str, client: str, k: int) -> list:
    """``client``'s unmask responses as they lie in its inbox (what a worker reading the inbox sees)."""
    out = []
    for _id, fields in redis.xrange(Inbox(redis, fed, client).key):
        record = wire.PhaseRecord.parse(next(iter(fields.values())))
        if record.phase is SecAggPhase.UNMASK:
            out.append(wire.parse_unmask(client, dict(record.payload), k))
    return out


def test_a_worker_lying_that_a_live_client_dropped_never_gets_both_of_its_shares(
    deployment, tiny_bert_dir, tmp_path, monkeypatch
):
    """A compromised worker (this test, with the workers' Redis access, once the honest workers are gone) rewrites
    the unmask request after an honest masked-input close: the live c3 is declared dropped. c1 and c2 reveal
    their share of c3's mask key and nothing else of c3; c3 itself reveals nothing. c0 dies right after sending
    its response, before noting it sent; the worker then asks again with c3 summed, to get c3's self-mask seed
    shares too, and c0, restarted from its keys on disk, sends its first response again: no client ever releases
    both kinds of share of one peer, so c3's input stays hidden (fewer than T self-seed shares of it exist)."""
    from chorus_mq.names import ShareKind
    from chorus_mq.secure_upload import SecureUpload

    torch.set_num_threads(1)
    fed = "seclie"
    clients = ["c0", "c1", "c2", "c3"]
    secrets = create_secure(deployment, tiny_bert_dir, fed, clients)
    operator = deployment.sdk()
    pub = round_public(operator, fed, 1)
    updates = {c: random_update(pub, 70 + i) for i, c in enumerate(clients)}
    ask = threading.Event()  # the clients read the unmask request only once the lie is written
    again = threading.Event()  # c0 restarts only once the second lie is written
    crashed = threading.Event()
    outcomes: dict[str, BaseException | None] = {}
    send = SecureUpload._send

    def send_then_die(self, phase, payload):  # c0's process dies between sending its response and noting it
        send(self, phase, payload)
        if self.client_id == "c0" and phase is SecAggPhase.UNMASK and not crashed.is_set():
            crashed.set()
            raise Stop(phase)

    monkeypatch.setattr(SecureUpload, "_send", send_then_die)

    def run(c: str) -> None:
        keys = tmp_path / f"keys-{c}"

        def hold(_r: int, phase: str) -> None:
            if phase == "unmask":
                assert ask.wait(60)

        try:
            try:
                deployment.sdk(client_secret=secrets[c]).secure_round(
                    fed, c, updates[c], round_=1, timeout=120, poll=0.05, state_dir=keys, on_phase=hold
                )
            except Stop:
                assert again.wait(60)
                deployment.sdk(client_secret=secrets[c]).secure_round(
                    fed, c, updates[c], round_=1, timeout=120, poll=0.05, state_dir=keys
                )
            outcomes[c] = None
        except BaseException as exc:
            outcomes[c] = exc

    running = Clients(run, clients)
    rounds = SecAggRounds(operator.redis, fed)
    wait_for(lambda: (s := rounds.state(1)) and s.phase is SecAggPhase.UNMASK, 90, "the honest masked-input close")
    assert rounds.state(1).survivors == tuple(clients)
    deployment.stop_workers()  # from here the only worker is the compromised one
    redis = deployment.redis()
    keys = FederationKeys(fed)

    def lie(survivors: list[str]) -> None:  # what a lying close writes: the request and who may answer it
        redis.hset(keys.secagg(1), "survivors", json.dumps(survivors))
        redis.delete(keys.secagg_members(1, SecAggPhase.UNMASK))
        redis.sadd(keys.secagg_members(1, SecAggPhase.UNMASK), *survivors)

    k = pub.neighbours
    lie(["c0", "c1", "c2"])
    ask.set()
    wait_for(lambda: crashed.is_set() and all(_unmask_records(redis, fed, c, k) for c in ("c1", "c2")), 60, "answers")
    wait_for(lambda: "c3" in outcomes, 30, "c3 to refuse")
    assert "counts it as dropped" in str(outcomes["c3"]), outcomes
    lie(clients)
    again.set()
    wait_for(lambda: len(_unmask_records(redis, fed, "c0", k)) == 2, 60, "c0's answer after its restart")

    released: dict[str, list[ShareKind]] = {}  # kinds of c3's shares, over every record of every client
    for c in clients:
        records = _unmask_records(redis, fed, c, k)
        kinds: dict[str, set[ShareKind]] = {}
        for response in records:
            for peer, (kind, _raw) in response.shares.items():
                kinds.setdefault(peer, set()).add(kind)
        assert all(len(v) == 1 for v in kinds.values()), (c, kinds)  # never both shares of one peer
        released.update({c: sorted(kinds.get("c3", ()))})
    assert released == {"c0": [ShareKind.MASK_KEY], "c1": [ShareKind.MASK_KEY], "c2": [ShareKind.MASK_KEY], "c3": []}
    first, second = _unmask_records(redis, fed, "c0", k)
    assert first == second  # the restarted c0 sent its first response again, not an answer to the second request

    # the compromised worker gives up: the round aborts and every waiting client stops
    state = rounds.state(1)
    assert rounds.close(1, SecAggPhase.UNMASK, state.epoch, "abort", reason="test: done").status == "aborted"
    running.join(timeout=60)
    assert all("aborted" in str(outcomes[c]) for c in ("c0", "c1", "c2")), outcomes
