"""Buffered (FedBuff) federations through worker subprocesses (redis-server, moto S3): flushes exact against a
float64 oracle that takes each delta relative to its own base version (fedex-lora; and the linear ffa-lora and
fed-sb, whose trained factor alone moves); a stale delta refused; a worker killed mid-flush; two flushes' worth
of uploads racing; beat flushing at the flush timeout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chorus_mq.aggregation.dp import PrivacyAccountant, gaussian_noise_dense, noise_generator
from chorus_mq.aggregation.robust import relative_clip_factors
from chorus_mq.errors import Rejected
from chorus_mq.layout import delta_key
from chorus_mq.messages import IngestMessage
from chorus_mq.names import ADAPTER_WEIGHTS, FED_SB_FILE, RoundStatus
from chorus_mq.staleness import StalenessRule
from chorus_mq.state import FederationConfig

from ..deltas import declared, random_factors, write_adapter, write_r_adapter
from ..server_opt_oracle import PEFT_PREFIX, published
from ..topology import wait_for
from .conftest import MARKS, MODULES, in_threads, timing, upload, wait_hook, wait_round

pytestmark = MARKS


def _random_product(i: int, name: str) -> np.ndarray:
    """``s_i B_i A_i`` of ``delta_file(i)``'s module ``name`` in float64."""
    A, B = random_factors(1000 + i, modules=MODULES, r=(2, 4)[i % 2])[name]
    return 8.0 / A.shape[0] * (B.double().numpy() @ A.double().numpy())


class BufferedOracle:
    """``x_v − W_0`` per module in float64, moved by ``η Σ p_i (s_i B_i A_i − s_b B_b A_b)`` each flush;
    ``product(i, module)`` is upload ``i``'s ``s_i B_i A_i`` (default: :func:`_random_product`)."""

    def __init__(self, start, lr: float, rule: str, product=_random_product):
        self.lr, self.rule, self.product = lr, StalenessRule.parse(rule), product
        self.x = published(start)[0]
        self.products = {0: published(start)[1]}  # each version's adapter product

    def flush(self, version: int, uploads: list[tuple[int, int]], weights: dict[int, float] | None = None):
        """Version ``version + 1`` from ``uploads`` [(upload i, base version)]; returns p by client ``c{i}``.
        ``weights``: each upload's weight before g (default uniform), then p is returned by upload i."""
        w = weights or dict.fromkeys((i for i, _ in uploads), 1.0)
        raw = {i: w[i] * self.rule.g(version - b) for i, b in uploads}
        total = math.fsum(raw.values())
        for name in MODULES:
            module = f"{PEFT_PREFIX}{name}"
            step = np.zeros_like(self.x[module])
            for i, b in uploads:
                step += raw[i] / total * (self.product(i, name) - self.products[b][module])
            self.x[module] = self.x[module] + self.lr * step
        if weights is not None:
            return {i: g / total for i, g in raw.items()}
        return {f"c{i}": g / total for i, g in raw.items()}

    def check(self, out, version: int) -> float:
        total, products, _ = published(out)
        self.products[version] = products
        return max(float(np.linalg.norm(total[m] - x) / np.linalg.norm(x)) for m, x in self.x.items())


def _create(sdk, name, tmp_path, **options):
    factors = random_factors(99, modules=MODULES, r=4, scale=0.05)
    path = write_adapter(tmp_path / f"{name}-initial.safetensors", factors)
    settings = {"quorum": 3, "relative_clip": 0.0, "weights": "uniform", "max_staleness": 2} | options
    config = FederationConfig(name=name, base_model="tiny", mode="buffered", **settings)
    sdk.create_federation(config, model=declared(factors), initial_adapter=path)
    start = tmp_path / f"{name}-0"
    sdk.pull(name, start, 0)
    return start


def _upload_all(sdk, name, uploads, delta_file):
    sdk.store.exists("warm-up")
    accepted = {}

    def one(i, b):
        try:
            accepted[i] = upload(sdk, name, f"c{i}", delta_file(i), 100.0, base_version=b)
        except BaseException as exc:  # re-raised below
            accepted[i] = exc

    in_threads(one, uploads)
    failed = {i: a for i, a in accepted.items() if isinstance(a, BaseException)}
    assert not failed, f"uploads without an acceptance: {failed}"
    return accepted


def _pull_and_check(sdk, oracle, name, v, uploads, tmp_path):
    p = oracle.flush(v - 1, uploads)
    out = tmp_path / f"{name}-{v}"
    manifest = sdk.pull(name, out, v)
    error = oracle.check(out, v)
    assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
    entries = {c.client_id: c for c in manifest.clients}
    assert sorted(entries) == sorted(p)
    for i, b in uploads:
        entry = entries[f"c{i}"]
        assert (entry.base_version, entry.staleness) == (b, v - 1 - b)
        assert math.isclose(entry.weight, p[f"c{i}"], rel_tol=1e-12)
    assert manifest.buffered == {"previous_version": v - 1, "server_lr": oracle.lr, "staleness_weight": "poly:0.5"}
    return manifest


def test_flushes_from_stale_bases_are_exact_and_a_too_stale_delta_is_refused(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    start = _create(sdk, "buf", tmp_path, server_lr=0.8, staleness_weight="poly:0.5")
    oracle = BufferedOracle(start, 0.8, "poly:0.5")
    deployment.start_worker()
    plan = {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (4, 1), (5, 0)], 3: [(6, 2), (7, 0), (8, 1)]}
    for v, uploads in plan.items():
        _upload_all(sdk, "buf", uploads, delta_file)
        assert wait_round(deployment, "buf", v) == "complete"
        _pull_and_check(sdk, oracle, "buf", v, uploads, tmp_path)
    assert sdk.state.latest_complete("buf") == 3 and sdk.state.current_round("buf") == 4
    with pytest.raises(Rejected, match=r"3 versions stale: the current version of 'buf' is 3"):
        sdk.upload("buf", delta_file(9), "c9", dataset_size=100.0, base_version=0, timeout=60)
    with pytest.raises(Rejected, match="not published yet"):
        sdk.upload("buf", delta_file(10), "c10", dataset_size=100.0, base_version=4, timeout=60)
    assert sdk.state.round("buf", 4).n == 0


def test_a_fast_client_contributes_twice_to_one_flush_and_shares_its_weight(deployment, delta_file, tmp_path):
    """--max-per-client-per-flush 2: c0 sends two deltas (from versions 1 and 0) into buffer 2, its third is
    refused naming the limit; each delta is its own term, exact against the oracle with c0's uniform weight
    split evenly between its two deltas (then discounted by each one's staleness)."""
    sdk = deployment.sdk()
    start = _create(sdk, "fast", tmp_path, max_per_client_per_flush=2, max_client_weight=1.0)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    deployment.start_worker()
    _upload_all(sdk, "fast", [(0, 0), (1, 0), (2, 0)], delta_file)  # three clients, once each
    assert wait_round(deployment, "fast", 1) == "complete"
    _pull_and_check(sdk, oracle, "fast", 1, [(0, 0), (1, 0), (2, 0)], tmp_path)
    first = upload(sdk, "fast", "c0", delta_file(3), 100.0, base_version=1)
    second = upload(sdk, "fast", "c0", delta_file(4), 100.0, base_version=0)
    assert (first.round, second.round) == (2, 2) and sdk.state.round("fast", 2).n == 2
    # the second delta's very record again, as a broker redelivery brings it once its upload was deleted:
    # judged from the workers' copy of its term (c0#2), a duplicate
    size = delta_file(4).stat().st_size
    wait_for(lambda: not sdk.store.exists(delta_key("fast", "c0", second.sha256)), 30, "the upload deleted")
    record = IngestMessage(
        federation="fast", client_id="c0", sha256=second.sha256, size=size, dataset_size=100.0, base_version=0
    )
    redelivered = sdk.submit(record, timeout=60)
    assert (redelivered.status, redelivered.round) == ("duplicate", 2)
    again = sdk.upload("fast", delta_file(4), "c0", dataset_size=100.0, base_version=0, timeout=60)
    assert (again.status, again.round) == ("duplicate", 2)
    with pytest.raises(Rejected, match=r"already has 2 deltas .* --max-per-client-per-flush is 2"):
        sdk.upload("fast", delta_file(6), "c0", dataset_size=100.0, base_version=1, timeout=60)
    upload(sdk, "fast", "c1", delta_file(5), 100.0, base_version=1)
    assert wait_round(deployment, "fast", 2) == "complete"
    assert set(sdk.state.deltas("fast", 2)) == {"c0", "c0#2", "c1"}
    # uploads 3, 4 (c0, half its weight each) and 5 (c1, all of its own)
    p = oracle.flush(1, [(3, 1), (4, 0), (5, 1)], weights={3: 0.25, 4: 0.25, 5: 0.5})
    manifest = sdk.pull("fast", tmp_path / "fast-2", 2)
    error = oracle.check(tmp_path / "fast-2", 2)
    assert error < 1e-6, f"version 2: {error:.2e} from the oracle"
    entries = sorted((c.client_id, c.sha256, c.base_version, c.staleness, c.weight) for c in manifest.clients)
    sha = {3: first.sha256, 4: second.sha256}
    c1 = next(c for c in manifest.clients if c.client_id == "c1")
    assert entries[:2] == sorted(("c0", sha[i], b, 1 - b, p[i]) for i, b in ((3, 1), (4, 0)))
    assert (c1.base_version, c1.staleness) == (1, 0) and math.isclose(c1.weight, p[5], rel_tol=1e-12)
    assert math.isclose(p[3] + p[4], 0.25 * (1 + 2**-0.5) / (0.25 * (1 + 2**-0.5) + 0.5), rel_tol=1e-12)
    # what rounds and status show: the client once, with its count of deltas, never the term c0#2
    summary = sdk.round("fast", 2, cosines=True)
    assert (summary.clients, summary.n, summary.deltas_per_client) == (("c0", "c1"), 3, {"c0": 2})
    assert summary.cosine is not None and set(summary.cosine) == {"c0", "c1"}
    assert all("#" not in c for r in sdk.status("fast").recent_rounds for c in r.clients)


def test_a_sampled_buffer_refuses_an_undrawn_client_and_its_next_draw_takes_it(deployment, delta_file, tmp_path):
    """--clients-per-round 2 of 4: an undrawn client's upload is refused with the not_selected verdict (nothing
    downloaded into the buffer), the drawn ones fill it, and a later buffer that draws the refused client
    takes the same bytes, exact against the oracle."""
    sdk = deployment.sdk()
    start = _create(sdk, "pick", tmp_path, quorum=2, clients_per_round=2, round_timeout=600)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    names = [f"c{i}" for i in range(4)]
    secrets = {c: sdk.add_client("pick", c).secret for c in names}
    sdk.state.abort("pick", 1, "clients registered: draw again")  # buffer 2 drawn from all four
    deployment.start_worker()
    chosen = sdk.state.round("pick", 2).selected
    outsider = next(c for c in names if c not in chosen)
    mine = delta_file(int(outsider[1:]))
    with pytest.raises(Rejected, match=f"client '{outsider}' was not selected for round 2"):
        deployment.sdk(client_secret=secrets[outsider]).upload(
            "pick", mine, outsider, dataset_size=100.0, base_version=0, timeout=60
        )
    assert sdk.state.round("pick", 2).n == 0
    v, version = 2, 0

    def flush(uploads: list[tuple[str, int]]) -> None:  # (client, delta_file index), all from ``version``
        for c, j in uploads:
            upload(deployment.sdk(client_secret=secrets[c]), "pick", c, delta_file(j), 100.0, base_version=version)
        assert wait_round(deployment, "pick", v) == "complete"
        oracle.flush(version, [(j, version) for _, j in uploads], weights={j: 1.0 for _, j in uploads})
        sdk.pull("pick", tmp_path / f"pick-{v}", v)
        assert oracle.check(tmp_path / f"pick-{v}", v) < 1e-6

    while outsider not in sdk.state.round("pick", v).selected:  # buffers of drawn clients, until one draws it
        flush([(c, 10 * v + int(c[1:])) for c in sdk.state.round("pick", v).selected])
        version, v = v, v + 1
        assert v < 12, "no buffer drew the refused client"
    other = next(c for c in sdk.state.round("pick", v).selected if c != outsider)
    flush([(outsider, int(outsider[1:])), (other, 10 * v + int(other[1:]))])  # the refused bytes, now taken
    assert sorted(sdk.state.deltas("pick", v)) == sorted([outsider, other])


def test_dp_flushes_release_the_clipped_update_plus_the_documented_noise(deployment, delta_file, tmp_path):
    """Server-side DP per flush over real workers (fedex-lora): each delta's update against its own base
    version clipped adapter-wide to C, fixed weights g(τ) / (K k), dense noise N(0, (z C / K)^2) per module;
    the published versions equal the float64 oracle with the noise the workers' secret key derives; the
    ledger counts a client's two deltas in one flush as one participation."""
    K, C, z, name = 3, 90.0, 0.5, "dp"
    sdk = deployment.sdk()
    start = _create(sdk, name, tmp_path, dp_noise_multiplier=z, clip_norm=C, max_per_client_per_flush=2)
    deployment.start_worker()
    rule = StalenessRule.parse("poly:0.5")
    x, products = published(start)[0], {0: published(start)[1]}
    key = sdk.state.noise_key(name)
    flushes = {1: [("c0", 0, 0), ("c1", 1, 0), ("c2", 2, 0)], 2: [("c0", 3, 1), ("c0", 4, 0), ("c1", 5, 1)]}
    clipped = 0
    for v, uploads in flushes.items():
        for c, i, b in uploads:
            upload(sdk, name, c, delta_file(i), 100.0, base_version=b)
        assert wait_round(deployment, name, v) == "complete"
        owners = [c for c, _, _ in uploads]
        for c, i, b in uploads:
            delta = {m: _random_product(i, m) - products[b][f"{PEFT_PREFIX}{m}"] for m in MODULES}
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
            clipped += norm > C
            w = rule.g(v - 1 - b) / (K * owners.count(c)) * min(1.0, C / norm)
            for m in MODULES:
                x[f"{PEFT_PREFIX}{m}"] = x[f"{PEFT_PREFIX}{m}"] + w * delta[m]
        noise = {}
        for m in MODULES:
            module = f"{PEFT_PREFIX}{m}"
            gen = noise_generator(key, name, v, module)
            noise[module] = gaussian_noise_dense(*x[module].shape, z * C / K, gen).double().numpy()
            x[module] = x[module] + noise[module]
        out = tmp_path / f"{name}-{v}"
        manifest = sdk.pull(name, out, v)
        total, products[v], _ = published(out)
        error = max(float(np.linalg.norm(total[m] - x[m]) / np.linalg.norm(x[m])) for m in x)
        assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
        drawn = np.concatenate([n.ravel() for n in noise.values()])
        assert abs(float(drawn.std()) / (z * C / K) - 1.0) < 0.15  # 384 draws: the std's sd is about 4%
        assert manifest.dp == {"noise_multiplier": z, "clip_norm": C, "delta": 1e-5, "quorum": K}
    assert 2 <= clipped < 6  # some updates were clipped, some were not (C between them; rng-fixed)
    privacy = sdk.status(name).privacy
    for client, flushes_in in (("c0", 2), ("c1", 2), ("c2", 1)):
        acc = PrivacyAccountant()
        acc.spend(z, rounds=flushes_in)
        assert privacy[client]["rounds"] == flushes_in
        assert math.isclose(privacy[client]["epsilon"], acc.epsilon(1e-5), rel_tol=1e-12)


def test_two_flushes_of_racing_uploads_lose_nothing_and_share_nothing(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    start = _create(sdk, "race", tmp_path)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    deployment.start_worker(concurrency=2)
    accepted = _upload_all(sdk, "race", [(i, 0) for i in range(6)], delta_file)
    assert wait_round(deployment, "race", 1) == "complete" and wait_round(deployment, "race", 2) == "complete"
    buffers = {v: sorted(sdk.state.deltas("race", v)) for v in (1, 2)}
    assert sorted(buffers[1] + buffers[2]) == [f"c{i}" for i in range(6)] and len(buffers[1]) == 3
    assert {a.round for a in accepted.values()} == {1, 2}
    for v in (1, 2):  # flush 2 moved version 1 with deltas trained from version 0: staleness 1
        uploads = [(int(c[1:]), 0) for c in buffers[v]]
        manifest = _pull_and_check(sdk, oracle, "race", v, uploads, tmp_path)
        assert {(c.client_id, c.sha256) for c in manifest.clients} == {
            (f"c{i}", accepted[i].sha256) for i, _ in uploads
        }


def test_a_worker_killed_mid_flush_loses_no_delta_and_publishes_the_oracles_version(deployment, delta_file, tmp_path):
    name = "buf-kill"
    deployment.env.update(
        timing(3, 4, 120, 5), CHORUS_SWEEP_INTERVAL="0.5", CHORUS_FAULT_PAUSE="shard=60", CHORUS_FAULT_ROUNDS="2"
    )
    sdk = deployment.sdk()
    start = _create(sdk, name, tmp_path)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    doomed = deployment.start_worker(faulty=True)
    first = [(0, 0), (1, 0), (2, 0)]
    _upload_all(sdk, name, first, delta_file)
    assert wait_round(deployment, name, 1) == "complete"
    _pull_and_check(sdk, oracle, name, 1, first, tmp_path)

    second = [(3, 1), (4, 0), (5, 1)]
    _upload_all(sdk, name, second, delta_file)
    wait_hook(deployment, "shard", name, "2:0")  # flush 2's objects are written, its shard not recorded
    deployment.kill(doomed)
    assert sdk.state.round(name, 2).state == RoundStatus.AGGREGATING
    assert sdk.state.round(name, 3).state == RoundStatus.OPEN  # the next buffer opened as flush 2 fired
    third = [(6, 1), (7, 0), (8, 1)]  # buffer 3 fills while flush 2 is stuck: it waits for version 2
    for i, b in third:  # queued now, judged by the next worker
        sdk.upload(name, delta_file(i), f"c{i}", dataset_size=100.0, base_version=b, wait=False)
    deployment.start_worker(faulty=True)
    deployment.start_beat()
    assert wait_round(deployment, name, 2) == "complete"
    _pull_and_check(sdk, oracle, name, 2, second, tmp_path)
    assert wait_round(deployment, name, 3) == "complete"
    _pull_and_check(sdk, oracle, name, 3, third, tmp_path)
    owners = {}
    for v in (1, 2, 3):
        for c in sdk.state.deltas(name, v):
            assert c not in owners
            owners[c] = v
    assert sorted(owners) == [f"c{i}" for i in range(9)]


def test_beat_flushes_at_the_timeout_with_min_buffer(deployment, delta_file, tmp_path):
    deployment.env.update(CHORUS_SWEEP_INTERVAL="0.5")
    sdk = deployment.sdk()
    start = _create(sdk, "tick", tmp_path, quorum=5, min_quorum=2, round_timeout=2)
    oracle = BufferedOracle(start, 1.0, "poly:0.5")
    deployment.start_worker()
    deployment.start_beat()
    _upload_all(sdk, "tick", [(0, 0)], delta_file)
    _upload_all(sdk, "tick", [(1, 0)], delta_file)
    assert wait_round(deployment, "tick", 1, timeout=60) == "complete"
    assert sdk.state.round("tick", 1).closed_by == "deadline"
    _pull_and_check(sdk, oracle, "tick", 1, [(0, 0), (1, 0)], tmp_path)
    assert sdk.state.round("tick", 2).state == RoundStatus.OPEN


def test_a_version_that_was_never_published_cannot_be_a_base(deployment, delta_file, tmp_path):
    sdk = deployment.sdk()
    _create(sdk, "gap", tmp_path, quorum=1)
    deployment.start_worker()
    _upload_all(sdk, "gap", [(0, 0)], delta_file)
    assert wait_round(deployment, "gap", 1) == "complete"
    assert sdk.state.abort("gap", 2, "operator").status == "aborted"  # buffer 2 never becomes a version
    _upload_all(sdk, "gap", [(1, 1)], delta_file)
    assert wait_round(deployment, "gap", 3) == "complete" and sdk.state.latest_complete("gap") == 3
    with pytest.raises(Rejected, match=r"version 2 was never published \(round 2 is aborted\)"):
        sdk.upload("gap", delta_file(2), "c2", dataset_size=100.0, base_version=2, timeout=60)
    _upload_all(sdk, "gap", [(3, 3)], delta_file)
    assert wait_round(deployment, "gap", 4) == "complete"


class LinearClients:
    """Deltas of a linear strategy trained from a pulled version: its trained factor (ffa-lora's B, fed-sb's R)
    plus seeded noise, the frozen factor exactly as published (fed-sb uploads R alone); each upload's float64
    product ``s X_i F`` kept for the oracle."""

    def __init__(self, strategy: str, root):
        self.sandwich, self.root = strategy == "fed-sb", root
        self.products: dict[int, dict[str, np.ndarray]] = {}

    def product(self, i: int, name: str) -> np.ndarray:
        return self.products[i][name]

    def delta(self, i: int, pulled, *, nudge_frozen: bool = False, spread: float = 0.3):
        """Client ``i``'s delta trained from the version pulled into ``pulled`` (its trained factor moved by
        ``spread`` times seeded noise); ``nudge_frozen``: its frozen A one ulp off (ffa-lora)."""
        tensors = load_file(pulled / (FED_SB_FILE if self.sandwich else ADAPTER_WEIGHTS))
        g = torch.Generator().manual_seed(2000 + i)
        self.products[i], out = {}, {}
        for name in MODULES:
            key = f"{PEFT_PREFIX}{name}"
            A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            if self.sandwich:
                R = tensors[f"{key}.lora_R.weight"] + spread * torch.randn(4, 4, generator=g)
                out[name] = R
                self.products[i][name] = 2.0 * (B.double() @ R.double() @ A.double()).numpy()
            else:
                B = B + spread * torch.randn(B.shape, generator=g)
                self.products[i][name] = 2.0 * (B.double() @ A.double()).numpy()
                if nudge_frozen:
                    A = A.clone()
                    A.view(-1)[0] = torch.nextafter(A.view(-1)[0], torch.tensor(1e9))
                out[name] = (A, B)
        path = self.root / f"delta{i}.safetensors"
        return write_r_adapter(path, out) if self.sandwich else write_adapter(path, out)


@pytest.mark.parametrize("strategy", ["ffa-lora", "fed-sb"])
def test_linear_flushes_move_the_trained_factor_exactly(deployment, tmp_path, strategy):
    """ffa-lora and fed-sb in buffered mode: three flushes of deltas from different base versions publish the
    oracle's model with no residual and the frozen frame of version 0 bit for bit; a too stale delta is
    refused, and so is one checked against its own (older) base version's frame."""
    name = strategy.replace("-", "")
    sdk = deployment.sdk()
    start = _create(sdk, name, tmp_path, strategy=strategy, server_lr=0.8, staleness_weight="poly:0.5")
    clients = LinearClients(strategy, tmp_path)
    oracle = BufferedOracle(start, 0.8, "poly:0.5", clients.product)
    frozen_file = FED_SB_FILE if clients.sandwich else ADAPTER_WEIGHTS
    frozen = [".lora_A.weight", ".lora_B.weight"] if clients.sandwich else [".lora_A.weight"]
    frame = {k: t for k, t in load_file(start / frozen_file).items() if k.endswith(tuple(frozen))}
    deployment.start_worker()
    plan = {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (4, 1), (5, 0)], 3: [(6, 2), (7, 0), (8, 1)]}
    for v, uploads in plan.items():
        paths = {i: clients.delta(i, tmp_path / f"{name}-{b}") for i, b in uploads}
        _upload_all(sdk, name, uploads, paths.__getitem__)
        assert wait_round(deployment, name, v) == "complete"
        manifest = _pull_and_check(sdk, oracle, name, v, uploads, tmp_path)
        assert all(shard.residual is None for shard in manifest.shards)  # no residual, ever
        pub = load_file(tmp_path / f"{name}-{v}" / frozen_file)
        assert all(torch.equal(pub[k], t) for k, t in frame.items())  # the frame, bit for bit
    with pytest.raises(Rejected, match=rf"3 versions stale: the current version of '{name}' is 3"):
        sdk.upload(name, clients.delta(9, tmp_path / f"{name}-0"), "c9", dataset_size=100.0, base_version=0, timeout=60)
    if clients.sandwich:  # an R of another rank than version 1's frame
        bad = write_r_adapter(tmp_path / "bad.safetensors", {m: torch.zeros(3, 3) for m in MODULES})
        match = r"lora_R is float32 \[4, 4\] \(the rank of the frame round 1 published\)"
    else:  # a frozen A one ulp off the one version 1 published
        bad = clients.delta(10, tmp_path / f"{name}-1", nudge_frozen=True)
        match = "not bit-identical to the one round 1 published"
    with pytest.raises(Rejected, match=match):
        sdk.upload(name, bad, "c10", dataset_size=100.0, base_version=1, timeout=60)
    assert sdk.state.round(name, 4).n == 0


@pytest.mark.parametrize(("clip_norm", "relative"), [(250.0, 0.0), (0.0, 3.0)])
def test_norm_bounds_clip_each_deltas_update_against_its_own_base(
    deployment, delta_file, tmp_path, clip_norm, relative
):
    """--clip-norm C / --relative-clip k outside DP (fedex-lora): a delta whose update is 30x the others' is
    clipped as a synchronous round clips (adapter-wide to C; k x the lower-median norm per module and
    adapter-wide) against its own base version, the flush weights are not renormalised around the clip, and the
    published versions equal the float64 oracle ``v + η Σ p_i c_i Δ_i``; the manifest names the clips."""
    lr, name, huge = 0.8, "clip" if clip_norm else "relclip", 4
    sdk = deployment.sdk()
    start = _create(
        sdk, name, tmp_path, clip_norm=clip_norm, relative_clip=relative, server_lr=lr, staleness_weight="poly:0.5"
    )
    big = {m: (a, b * 30.0) for m, (a, b) in random_factors(1000 + huge, modules=MODULES, r=(2, 4)[huge % 2]).items()}
    files = {huge: write_adapter(tmp_path / f"{name}-huge.safetensors", big)}
    deployment.start_worker()
    rule = StalenessRule.parse("poly:0.5")
    x, products = published(start)[0], {0: published(start)[1]}
    flushes = {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (huge, 0), (5, 1)]}
    for v, uploads in flushes.items():
        _upload_all(sdk, name, uploads, lambda i: files.get(i) or delta_file(i))
        assert wait_round(deployment, name, v) == "complete"
        raw = {i: rule.g(v - 1 - b) for i, b in uploads}
        deltas = {
            i: {
                m: (30.0 if i == huge else 1.0) * _random_product(i, m) - products[b][f"{PEFT_PREFIX}{m}"]
                for m in MODULES
            }
            for i, b in uploads
        }
        norms = torch.tensor(
            [[float(np.linalg.norm(deltas[i][m])) for i, _ in uploads] for m in MODULES], dtype=torch.float64
        )
        whole = norms.square().sum(0).sqrt()
        factors = torch.ones_like(norms)
        if clip_norm:
            factors = factors * torch.clamp(clip_norm / whole, max=1.0)[None, :]
        if relative:
            factors = factors * relative_clip_factors(norms, relative)  # robust's, tested on its own
        for k, (i, _) in enumerate(uploads):
            for j, m in enumerate(MODULES):
                c = float(factors[j, k])
                x[f"{PEFT_PREFIX}{m}"] += lr * raw[i] / sum(raw.values()) * c * deltas[i][m]
        want = {
            f"c{i}|{PEFT_PREFIX}{m}": float(factors[j, k])
            for k, (i, _) in enumerate(uploads)
            for j, m in enumerate(MODULES)
            if float(factors[j, k]) < 1.0
        }
        assert {key.split("|")[0] for key in want} == ({f"c{huge}"} if v == 2 else set())  # the bound between them
        out = tmp_path / f"{name}-{v}"
        manifest = sdk.pull(name, out, v)
        total, products[v], _ = published(out)
        error = max(float(np.linalg.norm(total[m] - x[m]) / np.linalg.norm(x[m])) for m in x)
        assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
        assert sorted(manifest.clipped) == sorted(want)
        assert all(math.isclose(manifest.clipped[k], f, rel_tol=1e-6) for k, f in want.items())


@pytest.mark.parametrize("strategy", ["ffa-lora", "fed-sb"])
def test_linear_norm_bounds_clip_each_deltas_step_against_its_own_base(deployment, tmp_path, strategy):
    """--relative-clip k on ffa-lora and fed-sb in buffered mode: a delta whose trained factor moved 30x the
    others' is clipped against its own base version (k x the lower-median norm), and the published versions are
    the float64 oracle's ``v + η Σ p_i c_i Δ_i`` with the frame unchanged; the manifest names the clip."""
    name = "clip" + strategy.replace("-", "")
    lr, k, huge = 0.8, 3.0, 4
    sdk = deployment.sdk()
    start = _create(sdk, name, tmp_path, strategy=strategy, relative_clip=k, server_lr=lr, staleness_weight="poly:0.5")
    clients = LinearClients(strategy, tmp_path)
    rule = StalenessRule.parse("poly:0.5")
    x, products = published(start)[0], {0: published(start)[1]}
    deployment.start_worker()
    for v, uploads in {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (huge, 0), (5, 1)]}.items():
        paths = {i: clients.delta(i, tmp_path / f"{name}-{b}", spread=9.0 if i == huge else 0.3) for i, b in uploads}
        _upload_all(sdk, name, uploads, paths.__getitem__)
        assert wait_round(deployment, name, v) == "complete"
        raw = {i: rule.g(v - 1 - b) for i, b in uploads}
        deltas = {i: {m: clients.product(i, m) - products[b][f"{PEFT_PREFIX}{m}"] for m in MODULES} for i, b in uploads}
        norms = torch.tensor(
            [[float(np.linalg.norm(deltas[i][m])) for i, _ in uploads] for m in MODULES], dtype=torch.float64
        )
        factors = relative_clip_factors(norms, k)
        for j, (i, _) in enumerate(uploads):
            for row, m in enumerate(MODULES):
                x[f"{PEFT_PREFIX}{m}"] += lr * raw[i] / sum(raw.values()) * float(factors[row, j]) * deltas[i][m]
        want = {
            f"c{i}|{PEFT_PREFIX}{m}": float(factors[row, j])
            for j, (i, _) in enumerate(uploads)
            for row, m in enumerate(MODULES)
            if float(factors[row, j]) < 1.0
        }
        assert {key.split("|")[0] for key in want} == ({f"c{huge}"} if v == 2 else set())
        out = tmp_path / f"{name}-{v}"
        manifest = sdk.pull(name, out, v)
        total, products[v], _ = published(out)
        error = max(float(np.linalg.norm(total[m] - x[m]) / np.linalg.norm(x[m])) for m in x)
        assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
        assert all(shard.residual is None for shard in manifest.shards)
        assert sorted(manifest.clipped) == sorted(want)
        assert all(math.isclose(manifest.clipped[key], f, rel_tol=1e-6) for key, f in want.items())


@pytest.mark.parametrize("strategy", ["ffa-lora", "fed-sb"])
def test_linear_dp_flushes_noise_the_trained_factor_alone(deployment, tmp_path, strategy):
    """Server-side DP per flush on ffa-lora and fed-sb, without secure aggregation: each delta's step of the
    trained factor against its own base version clipped adapter-wide to C, fixed weights g(τ) / (K k), noise
    N(0, (z C / K)^2) on the trained factor alone, all times η; the published versions equal the float64 oracle
    with the noise the workers' secret key derives, the frame is version 0's bit for bit, no residual appears,
    and the ledger counts each client's flushes."""
    K, z, lr, huge = 3, 0.5, 0.8, 4
    name = "dp" + strategy.replace("-", "")
    sdk = deployment.sdk()
    clients = LinearClients(strategy, tmp_path)
    trained = ".lora_R.weight" if clients.sandwich else ".lora_B.weight"
    size = len(MODULES) * (16 if clients.sandwich else 64)  # elements of the trained factor over the adapter
    C = 5 * 0.3 * math.sqrt(size)  # above every ordinary step (spread 0.3), far below the huge one's (spread 9)
    options = {"strategy": strategy, "server_lr": lr, "staleness_weight": "poly:0.5"}
    start = _create(sdk, name, tmp_path, dp_noise_multiplier=z, clip_norm=C, **options)
    tensors_file = FED_SB_FILE if clients.sandwich else ADAPTER_WEIGHTS
    versions = {0: load_file(start / tensors_file)}
    frame = {k: t for k, t in versions[0].items() if not k.endswith(trained)}
    key = sdk.state.noise_key(name)
    rule = StalenessRule.parse("poly:0.5")
    deployment.start_worker()
    for v, uploads in {1: [(0, 0), (1, 0), (2, 0)], 2: [(3, 1), (huge, 0), (5, 1)]}.items():
        paths = {i: clients.delta(i, tmp_path / f"{name}-{b}", spread=9.0 if i == huge else 0.3) for i, b in uploads}
        _upload_all(sdk, name, uploads, paths.__getitem__)
        assert wait_round(deployment, name, v) == "complete"
        x = {f"{PEFT_PREFIX}{m}{trained}": versions[v - 1][f"{PEFT_PREFIX}{m}{trained}"].double() for m in MODULES}
        for i, b in uploads:
            sent = load_file(paths[i])
            step = {k: sent[k].double() - versions[b][k].double() for k in x}
            c = min(1.0, C / math.sqrt(sum(float(s.square().sum()) for s in step.values())))
            assert (c < 1.0) == (i == huge)
            for k, s in step.items():
                x[k] = x[k] + lr * rule.g(v - 1 - b) / K * c * s
        for m in MODULES:
            k = f"{PEFT_PREFIX}{m}{trained}"
            gen = noise_generator(key, name, v, f"{PEFT_PREFIX}{m}")
            x[k] = x[k] + lr * gaussian_noise_dense(*x[k].shape, z * C / K, gen, torch.float64)
        out = tmp_path / f"{name}-{v}"
        manifest = sdk.pull(name, out, v)
        versions[v] = load_file(out / tensors_file)
        error = max(float((versions[v][k].double() - want).norm() / want.norm()) for k, want in x.items())
        assert error < 1e-6, f"version {v}: {error:.2e} from the oracle"
        assert all(torch.equal(versions[v][k], t) for k, t in frame.items())  # the frame, bit for bit
        assert all(shard.residual is None for shard in manifest.shards)
        assert manifest.dp == {"noise_multiplier": z, "clip_norm": C, "delta": 1e-5, "quorum": K}
    privacy = sdk.status(name).privacy
    acc = PrivacyAccountant()
    acc.spend(z, rounds=1)
    for client in ("c0", "c1", "c2", "c3", f"c{huge}", "c5"):
        assert privacy[client]["rounds"] == 1
        assert math.isclose(privacy[client]["epsilon"], acc.epsilon(1e-5), rel_tol=1e-12)
