import hashlib

import pytest
import torch
from peft import PeftModel

from chorus_mq.adapters import (
    LoraSpec,
    ResidualReader,
    fold_into_state_dict,
    iter_residual,
    load_adapter,
    read_residual,
    write_peft_adapter,
    write_residual,
    write_residual_adapter,
)
from chorus_mq.errors import AggregationError, IncompatibleDelta, InvalidAdapter
from chorus_mq.factors import Residual, factor_dense

from ._util import P, logits, tiny_gpt2, tiny_llama

LLAMA = [P + f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
# c_proj is square: a missing transpose would go unnoticed by shape checks there
GPT2 = [P + f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")]
# model factory, modules -> (d_out, d_in) in peft's B@A layout, target_modules, fan_in_fan_out
LAYOUTS = {
    "linear": (tiny_llama, dict.fromkeys(LLAMA, (32, 32)), ("q_proj", "v_proj"), False),
    "conv1d": (
        tiny_gpt2,
        {m: (96, 32) if m.endswith("c_attn") else (32, 32) for m in GPT2},
        ("c_attn", "attn.c_proj"),
        True,
    ),
}


def factors(shapes, seed=0):
    """Per module (A, B, scaling) with mixed ranks and scalings."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (m, (d_out, d_in)) in enumerate(shapes.items()):
        r = (4, 2, 4, 3)[i % 4]
        out[m] = (
            torch.randn(r, d_in, generator=g) * 0.3,
            torch.randn(d_out, r, generator=g) * 0.3,
            (2.0, 0.5, 2.0, 1.25)[i % 4],
        )
    return out


def model_with(factory, update, fan_in_fan_out):
    """The oracle: a base model whose weights were edited by hand (no chorus code)."""
    model = factory()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m, dense in update.items():
            w = params[m.removeprefix(P) + ".weight"]
            w += dense.T if fan_in_fan_out else dense
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_peft_adapter_loads_and_matches_hand_edited_weights(layout, tmp_path):
    factory, shapes, targets, fan = LAYOUTS[layout]
    fs = factors(shapes)
    spec = LoraSpec(r=8, lora_alpha=1, fan_in_fan_out=fan, target_modules=targets, use_rslora=True)
    digest = write_peft_adapter(tmp_path, fs, spec)
    assert digest == hashlib.sha256((tmp_path / "adapter_model.safetensors").read_bytes()).hexdigest()
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    base = logits(factory())
    assert not torch.allclose(logits(loaded), base, atol=1e-3)  # the adapter does something
    expected = model_with(factory, {m: s * B @ A for m, (A, B, s) in fs.items()}, fan)
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=1e-4, atol=1e-5)
    spec_out = load_adapter(tmp_path).spec
    assert not spec_out.use_rslora and spec_out.fan_in_fan_out == fan
    assert all(spec_out.scaling(m, A.shape[0]) == pytest.approx(s) for m, (A, _, s) in fs.items())


def test_peft_adapter_carries_modules_to_save(tmp_path):
    fs = factors(LAYOUTS["linear"][1])
    head = torch.randn(64, 32)
    spec = LoraSpec(r=4, lora_alpha=4, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
    write_peft_adapter(tmp_path, fs, spec, extras={P + "lm_head.weight": head})
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, head)
    with pytest.raises(InvalidAdapter, match="neither lora_A"):
        write_peft_adapter(tmp_path, fs, spec, extras={P + "model.norm.weight": torch.ones(32)})


def test_peft_adapter_refuses_modules_peft_would_drop(tmp_path):
    one = (torch.ones(1, 2), torch.ones(2, 1), 1.0)
    with pytest.raises(InvalidAdapter, match="silently ignore"):
        write_peft_adapter(tmp_path, {"model.layers.0.q_proj": one}, LoraSpec(r=1, lora_alpha=1))
    with pytest.raises(InvalidAdapter, match="not matched by adapter_config target_modules"):
        write_peft_adapter(tmp_path, {LLAMA[1]: one}, LoraSpec(r=1, lora_alpha=1, target_modules=("q_proj",)))
    assert not any(tmp_path.iterdir())


def test_residual_file_round_trip(tmp_path):
    left, right, dense = torch.randn(32, 3), torch.randn(3, 16), torch.randn(8, 16)
    res = {
        LLAMA[0]: Residual(left=left, right=right),
        LLAMA[1]: Residual(dense=dense.double()),
        LLAMA[2]: None,
        LLAMA[3]: Residual(left=torch.ones(8, 0), right=torch.ones(0, 8)),
    }  # rank 0: exactly zero
    sha = write_residual(tmp_path / "r.safetensors", res)
    assert write_residual(tmp_path / "r2.safetensors", dict(reversed(res.items()))) == sha
    back = read_residual(tmp_path / "r.safetensors")
    assert set(back) == {LLAMA[0], LLAMA[1]} and all(isinstance(v, Residual) for v in back.values())
    assert torch.equal(back[LLAMA[0]].left, left) and torch.equal(back[LLAMA[0]].right, right)
    assert back[LLAMA[1]].dense.dtype == torch.float32 and torch.equal(back[LLAMA[1]].dense, dense)
    assert [m for m, _ in iter_residual(tmp_path / "r.safetensors")] == [LLAMA[0], LLAMA[1]]


def test_residual_shapes_checked_on_write(tmp_path):
    with pytest.raises(AggregationError, match="do not pair"):  # a Residual cannot be built mismatched
        Residual(left=torch.ones(4, 2), right=torch.ones(3, 4))
    with pytest.raises(InvalidAdapter, match="non-empty 2-D"):
        write_residual(tmp_path / "r.safetensors", {LLAMA[0]: Residual(dense=torch.ones(0, 4))})
    with pytest.raises(InvalidAdapter, match=r"must be a chorus_mq\.factors\.Residual or None, got tuple"):
        write_residual(tmp_path / "r.safetensors", {LLAMA[0]: (torch.ones(4, 2), torch.ones(2, 4))})
    with pytest.raises(InvalidAdapter, match="silently ignore"):
        write_residual(tmp_path / "r.safetensors", {"model.x": Residual(dense=torch.ones(2, 2))})
    assert not any(tmp_path.iterdir())


def test_factor_is_exact_and_drops_zero_directions():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    left, right = factor_dense(dense)
    assert left.shape == (40, 3) and right.shape == (3, 24)
    torch.testing.assert_close(left @ right, dense, rtol=1e-5, atol=1e-5)
    assert factor_dense(torch.zeros(5, 4))[0].shape == (5, 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_plus_residual_adapter_plus_global_adapter_is_exact(layout, tmp_path):
    """The whole point: FedEx-LoRA's global adapter + residual adapter == the ideal update."""
    factory, shapes, targets, fan = LAYOUTS[layout]
    modules = list(shapes)
    clients = [factors(shapes, seed=s) for s in range(3)]
    weights = [0.5, 0.3, 0.2]
    glob, residual, ideal = {}, {}, {}
    for m in modules:
        ideal[m] = sum(
            w * s * B.double() @ A.double() for w, c in zip(weights, clients, strict=True) for A, B, s in [c[m]]
        )
        # FedAvg factors need a common rank; pad every client to 4 (zero rows/cols change nothing)
        A_avg = sum(
            w * torch.nn.functional.pad(c[m][0], (0, 0, 0, 4 - c[m][0].shape[0]))
            for w, c in zip(weights, clients, strict=True)
        )
        B_avg = sum(
            w * torch.nn.functional.pad(c[m][1], (0, 4 - c[m][1].shape[1]))
            for w, c in zip(weights, clients, strict=True)
        )
        glob[m] = (A_avg, B_avg, 2.0)
        R = ideal[m] - 2.0 * B_avg.double() @ A_avg.double()
        residual[m] = Residual(dense=R) if m == modules[0] else Residual(*factor_dense(R))
    spec = LoraSpec(r=4, lora_alpha=8, fan_in_fan_out=fan, target_modules=targets, modules_to_save=())
    write_peft_adapter(tmp_path / "global", glob, spec)
    assert write_residual_adapter(tmp_path / "residual", residual, spec) == len(modules)
    model = PeftModel.from_pretrained(factory(), tmp_path / "global", adapter_name="global")
    model.load_adapter(tmp_path / "residual", adapter_name="residual")
    model.base_model.set_adapter(["global", "residual"])
    expected = logits(model_with(factory, {m: d.float() for m, d in ideal.items()}, fan))
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)
    model.base_model.set_adapter("global")  # without the residual it is measurably off
    assert not torch.allclose(logits(model), expected, atol=1e-3)
    # folding the residual into the base instead gives the same model
    folded = factory()
    folded.load_state_dict(fold_into_state_dict(folded.state_dict(), residual, fan_in_fan_out=fan))
    on_folded = PeftModel.from_pretrained(folded, tmp_path / "global")
    torch.testing.assert_close(logits(on_folded), expected, rtol=1e-4, atol=1e-4)


def test_residual_adapter_skips_zero_residuals(tmp_path):
    spec = LoraSpec(r=4, lora_alpha=4, target_modules=("q_proj",))
    zero = Residual(dense=torch.zeros(32, 32))
    assert write_residual_adapter(tmp_path / "r", {LLAMA[0]: zero, LLAMA[1]: None}, spec) == 0
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fold_residuals_layouts(layout):
    factory, shapes, _, fan = LAYOUTS[layout]
    sd = factory().state_dict()
    res = {m: Residual(left=torch.randn(d_out, 2), right=torch.randn(2, d_in)) for m, (d_out, d_in) in shapes.items()}
    first = next(iter(res))
    res[first] = Residual(dense=res[first].left @ res[first].right)
    out = fold_into_state_dict(sd, res, fan_in_fan_out=fan)
    for m, value in res.items():
        dense = value.dense if value.dense is not None else value.left @ value.right
        key = m.removeprefix(P) + ".weight"
        manual = sd[key] + (dense.T if fan else dense)
        torch.testing.assert_close(out[key], manual)
    untouched = next(k for k in sd if k.endswith(("ln_f.weight", "norm.weight")))
    assert out[untouched] is sd[untouched]  # fp32 tensors that were not folded are shared, not copied


def test_fold_upcasts_bf16_and_refuses_to_drop_residuals():
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32, dtype=torch.bfloat16)}
    res = {LLAMA[0]: Residual(dense=torch.full((32, 32), 1e-3))}
    out = fold_into_state_dict(sd, res, fan_in_fan_out=False)
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    with pytest.raises(IncompatibleDelta, match="no base weight"):
        fold_into_state_dict(sd, {LLAMA[1]: Residual(dense=torch.ones(32, 32))}, fan_in_fan_out=False)
    with pytest.raises(IncompatibleDelta, match="fan_in_fan_out"):
        fold_into_state_dict(sd, {LLAMA[0]: Residual(dense=torch.ones(16, 32))}, fan_in_fan_out=True)


def _residual_file(tmp_path, tensors, fmt="chorus-residual/1"):
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "r.safetensors", metadata={"format": fmt})
    return tmp_path / "r.safetensors"


@pytest.mark.parametrize(
    "tensors, fmt, match",
    [
        ({LLAMA[0] + ".residual": torch.ones(2, 2)}, "pt", "not a residual file"),
        ({LLAMA[0] + ".residual_left": torch.ones(2, 1)}, None, "either .residual or both"),
        (
            {
                LLAMA[0] + ".residual": torch.ones(2, 2),
                LLAMA[0] + ".residual_left": torch.ones(2, 1),
                LLAMA[0] + ".residual_right": torch.ones(1, 2),
            },
            None,
            "either .residual or both",
        ),
        ({LLAMA[0] + ".weight": torch.ones(2, 2)}, None, "unexpected key"),
        ({LLAMA[0] + ".residual": torch.tensor([[float("nan")]])}, None, "1 NaN"),
        (
            {LLAMA[0] + ".residual_left": torch.ones(2, 1), LLAMA[0] + ".residual_right": torch.ones(2, 2)},
            None,
            "rank mismatch",
        ),
        ({"model.x.residual": torch.ones(2, 2)}, None, "silently ignore"),
    ],
)
def test_read_residual_refuses_bad_files(tmp_path, tensors, fmt, match):
    with pytest.raises(InvalidAdapter, match=match):
        read_residual(_residual_file(tmp_path, tensors, fmt or "chorus-residual/1"))


def test_residual_reader_checks_names_and_shapes_first_and_reads_by_module(tmp_path):
    left, right, dense = torch.randn(32, 3), torch.randn(3, 16), torch.randn(8, 16)
    write_residual(
        tmp_path / "r.safetensors", {LLAMA[0]: Residual(left=left, right=right), LLAMA[1]: Residual(dense=dense)}
    )
    with ResidualReader(tmp_path / "r.safetensors") as reader:
        assert reader.modules == [LLAMA[0], LLAMA[1]]
        assert reader.shape(LLAMA[0]) == (32, 16) and reader.form(LLAMA[0]) == ("factored", 3)
        assert reader.shape(LLAMA[1]) == (8, 16) and reader.form(LLAMA[1]) == ("dense", 0)
        assert torch.equal(reader.get(LLAMA[1]).dense, dense) and torch.equal(reader.get(LLAMA[0]).right, right)
    nan = {LLAMA[0] + ".residual": torch.tensor([[float("nan")]]), "model.x.residual": torch.ones(2, 2)}
    path = _residual_file(tmp_path, nan)
    with pytest.raises(InvalidAdapter, match="silently ignore"):  # a bad name is found before any value is read
        ResidualReader(path)
    poisoned = _residual_file(tmp_path, {LLAMA[0] + ".residual": torch.tensor([[float("nan")]])})
    with ResidualReader(poisoned) as reader, pytest.raises(InvalidAdapter, match="1 NaN"):
        reader.get(LLAMA[0])
