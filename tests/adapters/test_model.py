"""The federation's model declaration: from real checkpoints (headers only) and from reference adapters."""

import json
import os

import pytest
import torch

from chorus_mq.adapters import (
    DeltaFile,
    LoraSpec,
    ModelDecl,
    check_delta,
    load_adapter,
    model_decl_from_adapter,
    model_decl_from_dir,
    write_delta,
)
from chorus_mq.errors import ConfigError, IncompatibleDelta, InvalidAdapter, LimitExceeded

from ._util import P, bytes_read, lora_tensors, minilm_dir, save_peft, tiny_gpt2, tiny_llama

torch.set_num_threads(1)
LIMIT = 1 << 20
MINILM_TARGETS = ("query", "value")
BERT_Q = P + "encoder.layer.0.attention.self.query"


def _delta(adapter_dir, tmp_path, name="d.safetensors", **spec_changes):
    adapter = load_adapter(adapter_dir)
    if spec_changes:
        adapter = type(adapter)(spec=adapter.spec.replace(**spec_changes), tensors=adapter.tensors)
    write_delta(adapter, tmp_path / name)
    return DeltaFile.open(tmp_path / name, max_header_bytes=LIMIT)


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory):
    """A real PEFT SEQ_CLS adapter for BertForSequenceClassification with MiniLM's shapes (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(minilm_dir(), num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("minilm-adapter")
    return save_peft(model, out, r=4, lora_alpha=8, target_modules=list(MINILM_TARGETS), task_type="SEQ_CLS")


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny random Llama saved whole and sharded (model.safetensors.index.json), and a PEFT adapter for it."""
    root = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(root / "whole")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    save_peft(tiny_llama(), root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return root


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(root / "model")
    save_peft(
        tiny_gpt2(), root / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True
    )
    return root


def test_minilm_is_declared_from_its_headers_alone():
    model = minilm_dir() / "model.safetensors"
    before = bytes_read()
    decl = model_decl_from_dir(minilm_dir(), target_modules=MINILM_TARGETS, task_type="seq-cls")
    read = bytes_read() - before
    assert read < 64 * 1024 and model.stat().st_size > 80 * 2**20  # the header and config.json, not the weights
    assert len(decl.modules) == 12 and set(decl.modules.values()) == {(384, 384)}
    assert BERT_Q in decl.modules and decl.task_type == "SEQ_CLS" and not decl.fan_in_fan_out
    assert decl.target_modules == MINILM_TARGETS and decl.extras == {}
    full = model_decl_from_dir(minilm_dir())  # every 2-D float weight; LayerNorms and int buffers are not
    assert full.modules[P + "encoder.layer.0.intermediate.dense"] == (1536, 384)
    assert full.modules[P + "encoder.layer.0.output.dense"] == (384, 1536)
    assert P + "embeddings.position_ids" not in full.modules and len(full.modules) == 40


def test_a_task_model_adapter_fits_the_base_checkpoint(minilm_adapter, tmp_path):
    reference = model_decl_from_adapter(minilm_adapter)
    head = {P + "classifier.weight": (2, 384), P + "classifier.bias": (2,)}
    assert reference.extras == head and reference.task_type == "SEQ_CLS"
    assert P + "bert.encoder.layer.0.attention.self.query" in reference.modules
    decl = model_decl_from_dir(
        minilm_dir(), target_modules=MINILM_TARGETS, task_type="seq-cls", extras=reference.extras
    )
    assert decl.resolve(P + "bert.encoder.layer.5.attention.self.value") == P + "encoder.layer.5.attention.self.value"
    with _delta(minilm_adapter, tmp_path) as delta:
        check_delta(delta, decl, max_pattern_entries=16)  # passes: bert.-prefixed names resolve
    without_head = model_decl_from_dir(minilm_dir(), target_modules=MINILM_TARGETS, task_type="seq-cls")
    with _delta(minilm_adapter, tmp_path) as delta, pytest.raises(LimitExceeded, match=r"26 tensors; .* at most 24"):
        check_delta(delta, without_head, max_pattern_entries=16)  # the undeclared head is over the tensor cap


def test_sharded_checkpoint_declares_the_same_model(llama_dirs):
    assert (llama_dirs / "sharded" / "model.safetensors.index.json").is_file()
    whole, sharded = model_decl_from_dir(llama_dirs / "whole"), model_decl_from_dir(llama_dirs / "sharded")
    assert whole == sharded and len(whole.modules) == 16
    assert whole.modules[P + "model.layers.1.mlp.down_proj"] == (32, 64)
    assert whole.modules[P + "model.layers.0.mlp.gate_proj"] == (64, 32)


def test_target_modules_narrow_by_peft_suffix_rule(llama_dirs):
    decl = model_decl_from_dir(llama_dirs / "sharded", target_modules=["self_attn.q_proj", "down_proj"])
    assert sorted(m.rsplit(".", 1)[-1] for m in decl.modules) == ["down_proj"] * 2 + ["q_proj"] * 2
    with pytest.raises(ConfigError, match="no 2-D floating weight matching"):
        model_decl_from_dir(llama_dirs / "whole", target_modules=["c_attn"])


def test_llama_adapter_and_checkpoint_agree(llama_dirs, tmp_path):
    decl = model_decl_from_dir(llama_dirs / "sharded", target_modules=["q_proj", "v_proj", "down_proj"])
    reference = model_decl_from_adapter(llama_dirs / "adapter")
    assert reference.modules == decl.modules and reference.target_modules == ("down_proj", "q_proj", "v_proj")
    with _delta(llama_dirs / "adapter", tmp_path) as delta:
        check_delta(delta, decl, max_pattern_entries=16)
    # the delta file itself (config embedded) declares the same model
    assert model_decl_from_adapter(tmp_path / "d.safetensors") == reference


def test_gpt2_conv1d_is_transposed_and_sets_fan_in_fan_out(gpt2_dirs, tmp_path):
    decl = model_decl_from_dir(gpt2_dirs / "model", target_modules=["c_attn", "mlp.c_proj"])
    assert decl.fan_in_fan_out
    # Conv1D stores (d_in, d_out) = (32, 96); LoRA's B @ A is (d_out, d_in)
    assert decl.modules == {
        P + f"transformer.h.{i}.{m}": s
        for i in range(2)
        for m, s in (("attn.c_attn", (96, 32)), ("mlp.c_proj", (32, 128)))
    }
    assert model_decl_from_adapter(gpt2_dirs / "adapter") == decl.__class__(
        modules=decl.modules, fan_in_fan_out=True, target_modules=("c_attn", "mlp.c_proj"), task_type=None
    )
    with _delta(gpt2_dirs / "adapter", tmp_path) as delta:
        check_delta(delta, decl, max_pattern_entries=16)
    with (
        _delta(gpt2_dirs / "adapter", tmp_path, "linear.safetensors", fan_in_fan_out=False) as delta,
        pytest.raises(IncompatibleDelta, match="fan_in_fan_out=False but the federation's model has"),
    ):
        check_delta(delta, decl, max_pattern_entries=16)


def test_bare_safetensors_reference(tmp_path):
    from safetensors.torch import save_file

    save_file(lora_tensors(r=2, d_out=48), tmp_path / "bare.safetensors")
    decl = model_decl_from_adapter(tmp_path / "bare.safetensors")
    assert set(decl.modules.values()) == {(48, 32)} and decl.target_modules == ("q_proj", "v_proj")


def test_resolve():
    decl = ModelDecl(modules={P + "encoder.layer.0.q": (4, 4)})
    assert decl.resolve(P + "encoder.layer.0.q") == P + "encoder.layer.0.q"
    assert decl.resolve(P + "bert.encoder.layer.0.q") == P + "encoder.layer.0.q"
    assert decl.resolve(P + "a.bert.encoder.layer.0.q") is None  # only one component more
    assert decl.resolve("encoder.layer.0.q") is None and decl.resolve(P + "encoder.layer.0") is None


def test_json_round_trip_and_normalisation():
    decl = ModelDecl(
        modules={P + "b": [8, 4], P + "a": (4, 8)},
        extras={P + "head.weight": [2, 4]},
        fan_in_fan_out=False,
        target_modules=("b", "a", "a"),
        task_type="causal-lm",
    )
    assert list(decl.modules) == [P + "a", P + "b"] and decl.modules[P + "b"] == (8, 4)
    assert decl.target_modules == ("a", "b") and decl.task_type == "CAUSAL_LM"
    raw = decl.to_json()
    assert ModelDecl.from_json(raw) == decl and ModelDecl.from_json(raw).to_json() == raw
    assert hash(ModelDecl.from_json(raw)) == hash(decl)
    with pytest.raises(TypeError):
        decl.modules[P + "c"] = (1, 1)  # read-only after construction


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modules": {}}, "at least one module"),
        ({"modules": {"model.q": (4, 4)}}, "must be a name starting with 'base_model.model.'"),
        ({"modules": {P + "q": (4, 0)}}, "expected 2 integers in \\[1,"),
        ({"modules": {P + "q": (4, 4, 4)}}, "expected 2 integers"),
        ({"modules": {P + "q": (4, True)}}, "expected 2 integers"),
        ({"modules": {P + "q": (4, 4)}, "extras": {P + "q.lora_A.weight": (1, 4)}}, "is a LoRA key"),
        ({"modules": {P + "q": (4, 4)}, "extras": {P + "h.weight": (-1,)}}, "at most 8 integers in \\[0,"),
        ({"modules": {P + "q": (4, 4)}, "fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"modules": {P + "q": (4, 4)}, "target_modules": "q"}, "target_modules must be a list"),
        ({"modules": {P + "q": (4, 4)}, "task_type": 3}, "task_type must be a string"),
    ],
)
def test_bad_declarations_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelDecl(**kwargs)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"[]", "expected exactly the fields"),
        (b'{"modules": {}}', "expected exactly the fields"),
        (
            json.dumps(
                {
                    "modules": {P + "q": [4, 4]},
                    "extras": {},
                    "fan_in_fan_out": False,
                    "target_modules": "q",
                    "task_type": None,
                }
            ).encode(),
            "target_modules must be a list",
        ),
        (b'{"modules": 1, "modules": 2}', "duplicate key"),
        (b"\xff", "not valid UTF-8"),
    ],
)
def test_from_json_is_strict(raw, match):
    with pytest.raises(ConfigError, match=match):
        ModelDecl.from_json(raw)


def test_model_directory_errors(tmp_path, llama_dirs):
    with pytest.raises(ConfigError, match="not a directory"):
        model_decl_from_dir(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        model_decl_from_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"neither model\.safetensors"):
        model_decl_from_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidAdapter, match=r"pytorch_model\.bin \(pickle\)"):
        model_decl_from_dir(tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidAdapter, match="is not a safetensors file name in the model directory"):
        model_decl_from_dir(tmp_path)
    shard = next((llama_dirs / "sharded").glob("model-00001-*.safetensors"))
    os.link(shard, tmp_path / "s.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"nope.weight": "s.safetensors"}}))
    with pytest.raises(InvalidAdapter, match=r"puts 'nope\.weight' in s\.safetensors, whose header lacks it"):
        model_decl_from_dir(tmp_path)
    with pytest.raises(ConfigError, match="list of module names"):
        model_decl_from_dir(llama_dirs / "whole", target_modules="q_proj")


def test_spec_targets_rule_is_what_narrows():
    # the narrowing reuses LoraSpec.targets, peft's rule: a name matches itself or a dotted suffix
    spec = LoraSpec(r=1, lora_alpha=1, target_modules=("proj",))
    assert not spec.targets(P + "model.layers.0.self_attn.q_proj") and spec.targets(P + "model.proj")
