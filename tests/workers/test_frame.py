"""The linear strategies refer to their frozen factors where they were last written (``Manifest.frame``,
``workers.previous.round_frame``): a round's objects hold what it trained (and the head) only, every reader
(the next round's ingest, pull, a new directory, the next round's aggregate) resolves the rest, the published
model stays the float64 oracle's exact average, and nothing a later round refers to is ever deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chorus_mq.errors import Rejected
from chorus_mq.layout import rounds_prefix
from chorus_mq.manifest import Manifest
from chorus_mq.names import ADAPTER_WEIGHTS, Factor
from chorus_mq.pulled import LocalState
from chorus_mq.results import fetch_manifest
from chorus_mq.state import FederationConfig
from chorus_mq.strategy import strategy_spec
from chorus_mq.workers import runtime
from chorus_mq.workers.compact import compact

from ..deltas import declared, random_factors, write_adapter
from ..store_reads import count_adapter_reads

F64 = torch.float64
ROUNDS = 4
MODULES = ("layers.0.q", "layers.0.v", "layers.1.q")
RANK, ALPHA = 4, 8.0


def _key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.{factor}.weight"


def _round_objects(store_dir: Path, fed: str, r: int) -> list[Path]:
    return sorted((store_dir / rounds_prefix(fed) / f"{r:06d}").glob("*.safetensors"))


def _federation(sdk, tmp_path, strategy: str) -> dict[str, torch.Tensor]:
    """A federation of ``strategy`` whose round 0 publishes A seeded and B = 0; round 0's tensors."""
    seeded = random_factors(0, modules=MODULES, r=RANK)
    initial = {m: (a, torch.zeros_like(b)) for m, (a, b) in seeded.items()}
    path = write_adapter(tmp_path / "initial.safetensors", initial, alpha=ALPHA)
    config = FederationConfig(name="fed", base_model="m", quorum=2, strategy=strategy, max_client_weight=1.0)
    sdk.create_federation(config, model=declared(seeded), initial_adapter=path)
    return load_file(path)


@pytest.mark.parametrize("strategy", ["ffa-lora", "rolora"])
def test_rounds_write_only_the_trained_factor_and_stay_exact(sdk, tmp_path, strategy):
    torch.set_num_threads(1)
    spec = strategy_spec(strategy)
    published = {0: _federation(sdk, tmp_path, strategy)}
    store_dir = Path(str(sdk.settings.store).removeprefix("file://"))
    continuing = tmp_path / "continuing"
    sdk.pull("fed", continuing, 0)
    last_trained = {Factor.LORA_A: 0, Factor.LORA_B: 0}  # the round that last wrote each factor
    for r in range(1, ROUNDS + 1):
        trains, frozen = spec.trainable(r), spec.frozen(r)
        assert trains is not None and frozen is not None
        uploads = []
        for i in range(2):
            g = torch.Generator().manual_seed(100 * r + i)
            factors = {}
            for m in MODULES:
                held = published[r - 1][_key(m, frozen)]  # the start's frozen factor, as published
                if trains == Factor.LORA_B:
                    factors[m] = (held, torch.randn(16, RANK, generator=g))
                else:
                    factors[m] = (torch.randn(RANK, 12, generator=g), held)
            uploads.append(factors)
            path = write_adapter(tmp_path / f"r{r}-c{i}.safetensors", factors, alpha=ALPHA)
            sdk.upload("fed", path, f"c{i}", dataset_size=float(10 + 20 * i))
        manifest, _ = fetch_manifest(sdk.state, sdk.store, "fed", r)
        assert sdk.state.round("fed", r).state == "complete"

        # the round's objects hold the trained factor only: no frozen-factor byte is written again
        objects = _round_objects(store_dir, "fed", r)
        assert objects and {o.name for o in objects} == {Path(s.adapter.key).name for s in manifest.shards}
        for obj in objects:
            with safe_open(str(obj), "pt") as f:
                names = set(f.keys())
            assert names and all(n.endswith(f".{trains}.weight") for n in names), (r, names)
        trained_bytes = sum(4 * t.numel() for u in uploads[:1] for m in MODULES for t in [_pick(u[m], trains)])
        assert manifest.adapter_bytes == trained_bytes

        # it refers to where the frozen factor was last written: round 0 for ffa-lora, the round that trained it
        assert manifest.frame is not None and manifest.frame.factors == (str(frozen),)
        assert manifest.frame.round == last_trained[frozen]
        writer, _ = fetch_manifest(sdk.state, sdk.store, "fed", last_trained[frozen])
        assert manifest.frame.shards == writer.frame_source((frozen,)).shards
        last_trained[trains] = r

        # a continuing client fetches the round's objects only; a new directory resolves the frame; both agree
        fetched = count_adapter_reads(sdk.store)
        sdk.pull("fed", continuing, r)
        assert fetched[0] == sum(s.adapter.size for s in manifest.shards)
        fresh_dir = tmp_path / f"fresh-{r}"
        sdk.pull("fed", fresh_dir, r)
        got = load_file(continuing / ADAPTER_WEIGHTS)
        again = load_file(fresh_dir / ADAPTER_WEIGHTS)
        assert sorted(got) == sorted(again) and all(torch.equal(got[k], again[k]) for k in got)
        published[r] = got

        # exact: the float64 oracle's weighted average of the uploads' products; the frozen factor bit for bit
        weights = {e.client_id: e.weight for e in manifest.clients}
        scaling = ALPHA / RANK
        for m in MODULES:
            a, b = got[_key(m, "lora_A")].to(F64), got[_key(m, "lora_B")].to(F64)
            want = sum(weights[f"c{i}"] * scaling * (u[m][1].to(F64) @ u[m][0].to(F64)) for i, u in enumerate(uploads))
            assert float((scaling * b @ a - want).norm() / want.norm()) <= 1e-6, (r, m)
            assert torch.equal(got[_key(m, str(frozen))], published[r - 1][_key(m, str(frozen))])

    # an upload whose frozen factor moved is still refused against the published one, resolved through the frame
    r = ROUNDS + 1
    frozen = spec.frozen(r)
    assert frozen is not None
    moved = {m: (published[ROUNDS][_key(m, "lora_A")], published[ROUNDS][_key(m, "lora_B")]) for m in MODULES}
    a, b = moved[MODULES[0]]
    if frozen == Factor.LORA_A:
        a = a.clone()
        a.view(-1)[0] = torch.nextafter(a.view(-1)[0], torch.tensor(1e9))
    else:
        b = b.clone()
        b.view(-1)[0] = torch.nextafter(b.view(-1)[0], torch.tensor(1e9))
    moved[MODULES[0]] = (a, b)
    path = write_adapter(tmp_path / "moved.safetensors", moved, alpha=ALPHA)
    with pytest.raises(Rejected, match=f"freezes {frozen}.*not bit-identical"):
        sdk.upload("fed", path, "c0", dataset_size=10.0)

    # compaction and the sweep's collection delete nothing any round refers to
    rt = runtime.current()
    for upto in range(1, ROUNDS + 1):
        compact(rt, "fed", upto)
    from chorus_mq.workers.sweep import sweep

    sweep(rt, _NoDispatch())
    for r in range(ROUNDS + 1):
        manifest, _ = fetch_manifest(sdk.state, sdk.store, "fed", r)
        refs = [s.adapter for s in manifest.shards] + [
            s.adapter for s in (manifest.frame.shards if manifest.frame else ())
        ]
        for ref in refs:
            assert (store_dir / ref.key).is_file(), (r, ref.key)
    # and a new directory still pulls the last round, the same tensors
    last = tmp_path / "last"
    sdk.pull("fed", last, ROUNDS)
    again = load_file(last / ADAPTER_WEIGHTS)
    assert all(torch.equal(again[k], published[ROUNDS][k]) for k in published[ROUNDS])


def _pick(ab: tuple[torch.Tensor, torch.Tensor], factor: Factor) -> torch.Tensor:
    return ab[0] if factor == Factor.LORA_A else ab[1]


class _NoDispatch:
    def send(self, *args, **kwargs) -> None:
        pass


def test_an_edited_held_file_is_not_trusted_for_the_frozen_factor(sdk, tmp_path):
    """A continuing directory whose adapter file changed since its pull fetches the frame again."""
    torch.set_num_threads(1)
    published = _federation(sdk, tmp_path, "ffa-lora")
    for r in (1, 2):
        for i in range(2):
            g = torch.Generator().manual_seed(10 * r + i)
            factors = {m: (published[_key(m, "lora_A")], torch.randn(16, RANK, generator=g)) for m in MODULES}
            sdk.upload("fed", write_adapter(tmp_path / f"c{i}-{r}.safetensors", factors), f"c{i}", dataset_size=5.0)
    want = tmp_path / "want"
    sdk.pull("fed", want, 2)
    held = tmp_path / "held"
    sdk.pull("fed", held, 1)
    state = LocalState.load(held)
    assert state is not None and state.frames and state.published_sha256
    tensors = load_file(held / ADAPTER_WEIGHTS)
    key = _key(MODULES[0], "lora_A")
    tensors[key] = tensors[key] + 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(held / ADAPTER_WEIGHTS))
    sdk.pull("fed", held, 2)
    assert (held / ADAPTER_WEIGHTS).read_bytes() == (want / ADAPTER_WEIGHTS).read_bytes()


def test_a_manifest_without_factors_reads_as_fed_sbs_frame():
    """Fed-SB manifests written before other strategies referred to their frozen factors name no ``factors``."""
    shard = {
        "index": 0,
        "first": "a",
        "last": "b",
        "items": 2,
        "adapter": {"key": "f/rounds/000000/x", "sha256": "0" * 64, "size": 8},
        "residual": None,
    }
    body = {
        "federation": "f",
        "round": 1,
        "epoch": 1,
        "strategy": "fed-sb",
        "base_model": "m",
        "adapter_config": {},
        "clients": [],
        "shards": [shard],
        "frame": {"round": 0, "shards": [shard]},
        "format": json.loads(Manifest("f", 0, 0, "fed-sb", "m", {}, (), ()).to_json())["format"],
    }
    manifest = Manifest.from_json(json.dumps(body).encode())
    assert manifest.frame is not None and manifest.frame.factors == ("lora_A", "lora_B")
    assert manifest.frame_source().round == 0 and manifest.frame_source(("lora_B",)).round == 0
    # a round that refers to one factor holds the other itself
    one = Manifest.from_json(
        json.dumps({**body, "strategy": "rolora", "frame": {**body["frame"], "factors": ["lora_A"]}}).encode()
    )
    assert one.frame_source((Factor.LORA_A,)).round == 0 and one.frame_source((Factor.LORA_B,)).round == 1
    with pytest.raises(Exception, match="refers to its"):
        one.frame_source()


def test_a_shard_reads_the_trained_factor_alone_and_checks_the_module_with_the_published_one(sdk, tmp_path):
    """``RoundInputs.trained_update``: only the trained factor's bytes are fetched; the module's indexed digest is
    checked over the published frozen factor's bytes in place of the upload's, so anything else is refused."""
    from chorus_mq.errors import ChecksumMismatch
    from chorus_mq.workers.reading import RoundInputs

    published = _federation(sdk, tmp_path, "ffa-lora")
    g = torch.Generator().manual_seed(3)
    factors = {m: (published[_key(m, "lora_A")], torch.randn(16, RANK, generator=g)) for m in MODULES}
    sdk.upload("fed", write_adapter(tmp_path / "c0.safetensors", factors, alpha=ALPHA), "c0", dataset_size=5.0)
    inputs = RoundInputs(runtime.current(), sdk.state.deltas("fed", 1))
    module = f"base_model.model.{MODULES[0]}"
    a = published[_key(MODULES[0], "lora_A")].contiguous()
    update = inputs.trained_update("c0", module, 1.0, Factor.LORA_A, a, a.numpy().tobytes())
    assert update.A is a and torch.equal(update.B, factors[MODULES[0]][1])
    assert inputs.bytes_read == factors[MODULES[0]][1].numel() * 4  # B's bytes only
    moved = a.clone()
    moved.view(-1)[0] = torch.nextafter(moved.view(-1)[0], torch.tensor(1e9))
    with pytest.raises(ChecksumMismatch, match="indexed at ingest"):
        inputs.trained_update("c0", module, 1.0, Factor.LORA_A, moved, moved.numpy().tobytes())
    with pytest.raises(ChecksumMismatch, match="does not hold the published lora_A"):
        inputs.trained_update("c0", module, 1.0, Factor.LORA_A, a[:2], a[:2].numpy().tobytes())


def test_the_published_lora_a_is_hashed_once_for_every_holder_and_each_holder_is_still_checked(
    sdk, tmp_path, monkeypatch
):
    """``RoundInputs.trained_update`` (lora_A frozen, hashed first in a module's digest): the sha256 state after the
    published A is computed once and copied for each holder, which gives each holder's own digest: an honest
    upload read after another passes, and one whose stored B changed after ingest is refused."""
    import hashlib

    from chorus_mq.errors import ChecksumMismatch
    from chorus_mq.workers import reading

    published = _federation(sdk, tmp_path, "ffa-lora")
    g = torch.Generator().manual_seed(4)
    factors = {}
    for i in range(2):  # the round's quorum
        factors[i] = {m: (published[_key(m, "lora_A")], torch.randn(16, RANK, generator=g)) for m in MODULES}
        path = write_adapter(tmp_path / f"c{i}.safetensors", factors[i], alpha=ALPHA)
        sdk.upload("fed", path, f"c{i}", dataset_size=5.0 + i)
    records = sdk.state.deltas("fed", 1)
    module = f"base_model.model.{MODULES[0]}"
    a = published[_key(MODULES[0], "lora_A")].contiguous()
    raw = a.numpy().tobytes()
    hashed: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> object:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(reading.hashlib, "sha256", counting)
    inputs = reading.RoundInputs(runtime.current(), records)
    for i in (0, 1, 0):
        update = inputs.trained_update(f"c{i}", module, 1.0, Factor.LORA_A, a, raw)
        assert update.A is a and torch.equal(update.B, factors[i][MODULES[0]][1])
    assert hashed.count(len(raw)) == 1  # A's bytes hashed once for every read
    # the stored copy of c1's B changed after ingest: refused, however many holders were checked before it
    store_dir = Path(str(sdk.settings.store).removeprefix("file://"))
    stored = store_dir / records["c1"].key
    entry = inputs.indexes["c1"].modules[module]
    blob = bytearray(stored.read_bytes())
    blob[entry.b.begin] ^= 1
    stored.chmod(0o644)
    stored.write_bytes(bytes(blob))
    with pytest.raises(ChecksumMismatch, match="indexed at ingest"):
        inputs.trained_update("c1", module, 1.0, Factor.LORA_A, a, raw)
    assert inputs.trained_update("c0", module, 1.0, Factor.LORA_A, a, raw).B.equal(factors[0][MODULES[0]][1])
