"""Creating a federation: a Fed-SB round 0 publishes its frame in parts (contiguous runs of the sorted items), so a
later round's shard task, which reads the frame of its own modules from round 0, reads a few parts, not all."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save_file

from chorus_mq import federation
from chorus_mq.adapters import LoraSpec, ModelDecl
from chorus_mq.aggregation.sandwich import frame
from chorus_mq.layout import manifest_key
from chorus_mq.manifest import Manifest
from chorus_mq.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from chorus_mq.state import FederationConfig
from chorus_mq.store.file import FileStore

P = "base_model.model."
RANK = 4


def test_a_fed_sb_round_0_publishes_its_frame_in_parts(tmp_path, monkeypatch):
    modules = [f"{P}layer.{i}.q" for i in range(6)]
    tensors = {f"{P}score.weight": torch.randn(3, 16, generator=torch.Generator().manual_seed(0))}
    for i, m in enumerate(modules):
        b, a = frame(16, 16, RANK, seed=i, module=m)
        tensors |= {f"{m}.lora_B.weight": b, f"{m}.lora_A.weight": a}
    adapter = tmp_path / "initial"
    adapter.mkdir()
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS))
    spec = LoraSpec(r=RANK, lora_alpha=8, target_modules=("q",), task_type="SEQ_CLS", modules_to_save=("score",))
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(spec.to_peft_config()))
    decl = ModelDecl(modules=dict.fromkeys(modules, (16, 16)), extras={f"{P}score.weight": (3, 16)})
    config = FederationConfig(name="f", base_model="m", quorum=2, strategy="fed-sb")
    per_module = 2 * 16 * RANK * 4 + RANK * RANK * 4
    monkeypatch.setattr(federation, "FRAME_PART_BYTES", 2 * per_module)  # about two modules a part
    store = FileStore(str(tmp_path / "store"))
    federation._publish_initial(store, config, decl, adapter)
    manifest = Manifest.from_json(store.get_bytes(manifest_key("f", 0)))
    assert len(manifest.shards) >= 3 and manifest.frame is None  # round 0 holds its frame itself
    items = sorted([*modules, f"{P}score.weight"])
    got: dict[str, torch.Tensor] = {}
    at = 0
    for k, shard in enumerate(manifest.shards):
        part = load(store.get_bytes(shard.adapter.key))
        assert shard.index == k and (shard.first, shard.last) == (items[at], items[at + shard.items - 1])
        assert {key.split(".lora_")[0] for key in part} == set(items[at : at + shard.items])  # its own items only
        at += shard.items
        got |= part
    assert at == len(items) and manifest.adapter_bytes == sum(s.adapter.size for s in manifest.shards)
    assert all(torch.equal(got[k], t) for k, t in tensors.items())  # the frame and head, bit for bit
    assert all(not got[f"{m}.lora_R.weight"].any() for m in modules)  # R = 0
    assert manifest.frame_source().shards == tuple(manifest.shards)
