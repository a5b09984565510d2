import json

import pytest
import torch
from safetensors import safe_open

from chorus_mq.adapters import DeltaFile, LoraSpec, load_adapter, validate_local, write_delta
from chorus_mq.adapters.delta import normalise_key
from chorus_mq.errors import ConfigError, InvalidAdapter
from chorus_mq.names import DELTA_FORMAT

from ._util import P, Q, V, delta_bytes, lora_tensors, peft_config, save_peft, tiny_llama, write

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    return save_peft(
        tiny_llama(),
        out,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
    )


def test_load_peft_directory(llama_dir):
    adapter = load_adapter(llama_dir)
    assert adapter.spec.r == 4 and adapter.spec.modules_to_save == ("lm_head",)
    with safe_open(llama_dir / "adapter_model.safetensors", "pt") as f:
        assert set(adapter.tensors) == set(f.keys())
        assert all(torch.equal(adapter.tensors[k], f.get_tensor(k)) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert adapter.tensors[P + "model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 32)


def test_write_delta_is_normalised_and_deterministic(llama_dir, tmp_path):
    adapter = load_adapter(llama_dir)
    sha = write_delta(adapter, tmp_path / "a.safetensors")
    reordered = type(adapter)(spec=adapter.spec, tensors=dict(reversed(adapter.tensors.items())))
    assert write_delta(reordered, tmp_path / "b.safetensors") == sha
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == DELTA_FORMAT
    assert LoraSpec.from_peft_config(json.loads(meta["adapter_config"])) == adapter.spec
    again = load_adapter(tmp_path / "a.safetensors")  # a delta carries its own config
    assert again.spec == adapter.spec and again.tensors.keys() == adapter.tensors.keys()


def test_delta_file_opens_lazily_and_reports(llama_dir, tmp_path):
    write_delta(load_adapter(llama_dir), tmp_path / "d.safetensors")
    with DeltaFile.open(tmp_path / "d.safetensors", max_header_bytes=LIMIT) as delta:
        assert delta.modules == sorted(delta.modules) and len(delta.modules) == 4
        assert delta.extras == [P + "lm_head.weight"]
        q1 = P + "model.layers.1.self_attn.q_proj"
        assert delta.shapes[q1] == (2, 32, 32)
        assert delta.nbytes == sum(t.numel() * 4 for t in load_adapter(llama_dir).tensors.values())
        A, B = delta.factors(q1)
        assert A.shape == (2, 32) and B.shape == (32, 2) and A.dtype == torch.float32
        assert delta.extra(P + "lm_head.weight").shape == (64, 32)
        assert delta.spec.scaling(q1, 2) == 4.0
        with pytest.raises(KeyError):
            delta.factors(P + "nope")


def test_one_bad_module_does_not_stop_reading_others(tmp_path):
    t = lora_tensors()
    t[f"{V}.lora_B.weight"][0, 0] = float("nan")
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config()))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:  # opening reads no tensor data
        assert torch.equal(delta.factors(Q)[0], t[f"{Q}.lora_A.weight"])
        with pytest.raises(InvalidAdapter, match="lora_B contains 1 NaN"):
            delta.factors(V)


def test_file_dtype_is_kept(tmp_path):
    path = write(tmp_path / "d.safetensors", delta_bytes(lora_tensors(dtype=torch.bfloat16), peft_config()))
    with DeltaFile.open(path, max_header_bytes=LIMIT) as delta:
        assert delta.factors(Q)[1].dtype == torch.bfloat16 and delta.dtypes == ["BF16"]


def test_explicit_spec_overrides_embedded(tmp_path):
    path = write(tmp_path / "d.safetensors", delta_bytes(lora_tensors(), peft_config(alpha=8)))
    spec = LoraSpec(r=4, lora_alpha=2, target_modules=("q_proj", "v_proj"))
    with DeltaFile.open(path, max_header_bytes=LIMIT, spec=spec) as delta:
        assert delta.spec.scaling(Q, 4) == 0.5


def test_in_memory_default_keys_are_normalised(tmp_path):
    t = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in lora_tensors().items()
    }
    t[P + "lm_head.modules_to_save.default.weight"] = torch.ones(64, 32)
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config(modules_to_save=["lm_head"])))
    adapter = load_adapter(path)
    assert set(adapter.tensors) == set(lora_tensors()) | {P + "lm_head.weight"}
    assert normalise_key(P + "x.lora_B.default.weight") == P + "x.lora_B.weight"


def test_bare_file_infers_spec(tmp_path):
    t = lora_tensors(r=4) | lora_tensors(modules=[P + "model.layers.1.mlp.up_proj"], r=2, d_out=64, seed=3)
    path = write(tmp_path / "bare.safetensors", delta_bytes(t))
    spec = load_adapter(path).spec
    assert spec.r == 4 and spec.target_modules == ("q_proj", "up_proj", "v_proj")
    up = P + "model.layers.1.mlp.up_proj"
    assert spec.rank_for(up) == 2
    assert spec.scaling(Q) == spec.scaling(up) == 1.0  # lora_alpha defaults to each module's rank
    given = load_adapter(path, lora_alpha=8, use_rslora=True).spec
    assert given.scaling(Q) == 4.0 and given.scaling(up) == 8 / 2**0.5
    assert load_adapter(path, use_rslora=True).spec.scaling(up) == pytest.approx(1.0)
    assert load_adapter(path, fan_in_fan_out=True).spec.fan_in_fan_out


def test_overrides_refused_for_configured_adapters(llama_dir):
    with pytest.raises(ConfigError, match="own adapter_config"):
        load_adapter(llama_dir, lora_alpha=4)


def test_validate_local_summary(llama_dir, tmp_path):
    write_delta(load_adapter(llama_dir), tmp_path / "d.safetensors")
    summary = validate_local(tmp_path / "d.safetensors")
    assert summary.ranks[P + "model.layers.1.self_attn.q_proj"] == 2 and len(summary.modules) == 4
    assert summary.dtypes == ("F32",) and summary.extras == (P + "lm_head.weight",)
    assert summary.nbytes > 0


def test_mixed_dtypes_across_modules_are_reported(tmp_path):
    t = lora_tensors(modules=[Q]) | lora_tensors(modules=[V], dtype=torch.float16)
    path = write(tmp_path / "d.safetensors", delta_bytes(t, peft_config()))
    assert validate_local(path).dtypes == ("F16", "F32")
